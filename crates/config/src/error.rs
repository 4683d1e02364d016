use std::fmt;
use std::path::{Path, PathBuf};

/// Everything wrong with one config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<Problem>,
}

/// One problem: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Line and column, both 1-based, when known.
    pub location: Option<(usize, usize)>,
    /// Field path such as `agents[1].site`; empty for syntax errors.
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn single(file: &Path, location: Option<(usize, usize)>, field: &str, message: &str) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            problems: vec![Problem {
                location,
                field: field.to_string(),
                message: message.to_string(),
            }],
        }
    }

    pub(crate) fn from_yaml(file: &Path, err: &serde_yaml::Error) -> Self {
        let location = err.location().map(|l| (l.line(), l.column()));
        let mut message = err.to_string();
        // serde_yaml appends " at line L column C"; the location goes in front.
        if let Some(cut) = message.find(" at line ") {
            message.truncate(cut);
        }
        ConfigError::single(file, location, "", &message)
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file.display())?;
            if let Some((line, column)) = problem.location {
                write!(f, ":{line}:{column}")?;
            }
            write!(f, ": ")?;
            if !problem.field.is_empty() {
                write!(f, "{}: ", problem.field)?;
            }
            write!(f, "{}", problem.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}
