//! Looks up the users that commands run as, through NSS (getpwnam_r), so
//! that users from LDAP or sssd resolve like they do for `su`.
#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::path::PathBuf;

use crate::agent::RunAs;

pub(crate) fn lookup(name: &str) -> Result<Option<RunAs>, String> {
    let c_name = CString::new(name).map_err(|_| format!("{name:?} contains a NUL byte"))?;
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        // SAFETY: getpwnam_r writes into `entry` and `buffer`, both owned
        // here and outliving the call; `found` points into `entry` or is null.
        let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
        let mut found: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                c_name.as_ptr(),
                &mut entry,
                buffer.as_mut_ptr().cast(),
                buffer.len(),
                &mut found,
            )
        };
        if rc == libc::ERANGE && buffer.len() < 1 << 20 {
            buffer.resize(buffer.len() * 4, 0);
            continue;
        }
        if rc != 0 {
            return Err(format!(
                "cannot look up user {name:?}: {}",
                std::io::Error::from_raw_os_error(rc)
            ));
        }
        if found.is_null() {
            return Ok(None);
        }
        // SAFETY: pw_dir is a NUL-terminated string inside `buffer`.
        let home = unsafe { CStr::from_ptr(entry.pw_dir) }.to_string_lossy().into_owned();
        return Ok(Some(RunAs {
            name: name.to_string(),
            uid: entry.pw_uid,
            gid: entry.pw_gid,
            home: PathBuf::from(home),
        }));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_root_and_not_a_made_up_user() {
        let root = lookup("root").expect("lookup").expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(lookup("no-such-user-dicops").expect("lookup").is_none());
    }
}
