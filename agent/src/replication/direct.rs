//! Writing a file's bytes in order around the page cache (O_DIRECT).
//!
//! A replication destination writes gigabytes that nobody reads soon after:
//! through the page cache they cost a copy into freshly allocated cache
//! pages and push out what the host's other work had cached. On the
//! benchmark machine (BENCHMARKS.md, 5d) `dd` writes 2 GiB in 8.1 s through
//! the page cache and in 1.3 s with O_DIRECT, and the kernel's copy into the
//! cache was 42% of the destination's CPU in a fresh copy.
//!
//! A [`DirectStream`] collects the bytes of one file that arrive in order in
//! a 4 KiB-aligned buffer and writes each full buffer with O_DIRECT at an
//! aligned offset. What is left when the stream ends (the file's last
//! partial block, or whatever was buffered when a chunk came out of order)
//! goes through the file's ordinary descriptor. A file system that refuses
//! O_DIRECT (the open, or a write, fails with EINVAL) gets ordinary writes.
//! Durability is unchanged: the build is flushed (syncfs) before it is
//! published.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// Alignment of buffer addresses, lengths and file offsets for O_DIRECT:
/// the largest logical block size in common use.
pub const ALIGN: usize = 4096;
/// Bytes written per O_DIRECT call (`dd` reaches 1.9 GB/s with 1 MiB
/// blocks on the benchmark machine). What a stream holds is lost if the
/// process is killed, so the retry fetches it again: keep it small.
pub const BUFFER: usize = 1 << 20;

/// A buffer whose window `[start, start + BUFFER)` is ALIGN-aligned in
/// memory (a plain Vec, over-allocated, never grown: no unsafe code).
pub struct AlignedBuffer {
    storage: Vec<u8>,
    start: usize,
}

impl AlignedBuffer {
    pub fn new() -> AlignedBuffer {
        let storage = vec![0u8; BUFFER + ALIGN];
        let start = storage.as_ptr().align_offset(ALIGN);
        AlignedBuffer { storage, start }
    }

    fn window(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + BUFFER]
    }
}

/// One file's in-order bytes on their way to disk around the page cache.
pub struct DirectStream {
    file: File,
    buffer: AlignedBuffer,
    /// File offset of the window's first byte (a multiple of ALIGN).
    at: u64,
    /// Bytes in the window.
    filled: usize,
    /// Bytes written with O_DIRECT so far.
    pub direct_bytes: u64,
}

impl DirectStream {
    /// Opens `path` (which exists) for O_DIRECT writes from offset 0; None
    /// when the file system refuses.
    pub fn open(path: &Path, buffer: AlignedBuffer) -> Result<DirectStream, (AlignedBuffer, io::Error)> {
        match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(file) => Ok(DirectStream {
                file,
                buffer,
                at: 0,
                filled: 0,
                direct_bytes: 0,
            }),
            Err(e) => Err((buffer, e)),
        }
    }

    /// The file offset the next in-order bytes go to.
    pub fn end(&self) -> u64 {
        self.at + self.filled as u64
    }

    /// Appends the bytes at [`end`](Self::end); full windows go to disk.
    /// `fallback` is the file's ordinary descriptor, used if the file
    /// system refuses a direct write.
    pub fn push(&mut self, mut bytes: &[u8], fallback: &File) -> io::Result<()> {
        while !bytes.is_empty() {
            let n = (BUFFER - self.filled).min(bytes.len());
            let filled = self.filled;
            self.buffer.window()[filled..filled + n].copy_from_slice(&bytes[..n]);
            self.filled += n;
            bytes = &bytes[n..];
            if self.filled == BUFFER {
                self.write_window(BUFFER, fallback)?;
                self.at += BUFFER as u64;
                self.filled = 0;
            }
        }
        Ok(())
    }

    /// Writes what is buffered (its aligned part with O_DIRECT, the rest
    /// through `fallback`) and gives the buffer back for the next stream.
    pub fn finish(mut self, fallback: &File) -> io::Result<(AlignedBuffer, u64)> {
        let aligned = self.filled / ALIGN * ALIGN;
        if aligned > 0 {
            self.write_window(aligned, fallback)?;
        }
        if aligned < self.filled {
            let (at, filled) = (self.at + aligned as u64, self.filled);
            fallback.write_all_at(&self.buffer.window()[aligned..filled], at)?;
        }
        Ok((self.buffer, self.direct_bytes))
    }

    /// Writes the window's first `len` bytes (a multiple of ALIGN) at `at`.
    fn write_window(&mut self, len: usize, fallback: &File) -> io::Result<()> {
        let at = self.at;
        let mut done = 0usize;
        while done < len {
            let window = &self.buffer.storage[self.buffer.start..self.buffer.start + len];
            match self.file.write_at(&window[done..], at + done as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                // A short direct write leaves an unaligned rest, which only
                // an ordinary write can take.
                Ok(n) if !(done + n).is_multiple_of(ALIGN) => {
                    self.direct_bytes += n as u64;
                    done += n;
                    return fallback.write_all_at(&window[done..], at + done as u64);
                }
                Ok(n) => {
                    self.direct_bytes += n as u64;
                    done += n;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // The file system does not take direct writes after all.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    return fallback.write_all_at(&window[done..], at + done as u64);
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[test]
    fn bytes_pushed_in_pieces_land_byte_identical_with_an_unaligned_end() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let want = pattern(BUFFER * 5 + 12_345, 7);
        let ordinary = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .expect("create");
        ordinary.set_len(want.len() as u64).expect("size");
        let mut stream = match DirectStream::open(&path, AlignedBuffer::new()) {
            Ok(stream) => stream,
            Err((_, e)) => {
                // Only a file system without O_DIRECT may refuse.
                assert_eq!(e.raw_os_error(), Some(libc::EINVAL), "{e}");
                return;
            }
        };
        // Pieces of odd sizes, as chunks are.
        let mut rest = want.as_slice();
        for size in [1usize, 4095, 70_000, 3 << 20].iter().cycle() {
            if rest.is_empty() {
                break;
            }
            let n = (*size).min(rest.len());
            assert_eq!(stream.end(), (want.len() - rest.len()) as u64);
            stream.push(&rest[..n], &ordinary).expect("push");
            rest = &rest[n..];
        }
        let (_, direct) = stream.finish(&ordinary).expect("finish");
        assert_eq!(std::fs::read(&path).expect("read"), want);
        // Everything but the last partial block went around the cache.
        assert_eq!(direct, (want.len() / ALIGN * ALIGN) as u64);
    }
}
