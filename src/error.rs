//! Errors as values: every failure a user can cause is an `Error` with a one-line message.

use std::fmt;

/// What went wrong, which decides the process exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A value that can never be valid (bad CLI argument, impossible size): exit code 2.
    Usage,
    /// Tensor shapes that do not fit an op.
    Shape,
    /// A file that cannot be read or written.
    Io,
    /// A file whose contents are corrupt or of the wrong format.
    Format,
    /// A device that is missing or failed (no GPU, CUDA error).
    Device,
    /// A loss or gradient became NaN or infinite.
    NonFinite,
    /// An allocation (host or device memory) that did not fit.
    OutOfMemory,
    /// A run stopped on request (Ctrl-C from Python); its folder resumes from the last checkpoint.
    Interrupted,
}

/// The crate's error: a kind and a message naming the file, argument or shape at fault.
#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A new error of `kind`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Error {
        Error { kind, message: message.into() }
    }
    /// A value that can never be valid.
    pub fn usage(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Usage, message)
    }
    /// Shapes that do not fit.
    pub fn shape(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Shape, message)
    }
    /// A corrupt or foreign file.
    pub fn format(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Format, message)
    }
    /// An I/O failure on `path`.
    pub fn io(path: &std::path::Path, err: std::io::Error) -> Error {
        Error::new(ErrorKind::Io, format!("{}: {err}", path.display()))
    }
    /// A device failure.
    pub fn device(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::Device, message)
    }
    /// An allocation that did not fit (host or device memory).
    pub fn out_of_memory(message: impl Into<String>) -> Error {
        Error::new(ErrorKind::OutOfMemory, message)
    }
    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    /// The message without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }
    /// The process exit code for this error: 2 for a value that can never be valid, else 1.
    pub fn exit_code(&self) -> i32 {
        match self.kind {
            ErrorKind::Usage => 2,
            _ => 1,
        }
    }
    /// The same error with `context: ` put in front of the message.
    pub fn context(self, context: impl fmt::Display) -> Error {
        Error { kind: self.kind, message: format!("{context}: {}", self.message) }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// Returns early with an error of the given kind and a formatted message.
#[macro_export]
macro_rules! bail {
    ($ctor:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::$ctor(format!($($arg)*)))
    };
}

/// Implements `From<T> for String` (through `Display`) and `TryFrom<String>` (through `FromStr`)
/// for each type: what `#[serde(into = "String", try_from = "String")]` needs, so that a choice
/// (method, model, device, ...) reads and writes config.json as the word the command line takes.
macro_rules! string_conversions {
    ($($ty:ty),+ $(,)?) => {$(
        impl From<$ty> for String {
            fn from(v: $ty) -> String {
                v.to_string()
            }
        }

        impl TryFrom<String> for $ty {
            type Error = $crate::error::Error;
            fn try_from(s: String) -> $crate::error::Result<$ty> {
                s.parse()
            }
        }
    )+};
}

pub(crate) use string_conversions;

/// Lists `words` as prose: `a`, `a or b`, `a, b or c`.
pub(crate) fn or_list(words: &[&str]) -> String {
    match words.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        Some((last, _)) => last.to_string(),
        None => String::new(),
    }
}

/// Defines a choice the command line takes as a word, from one table of variants and their words:
/// the enum, `ALL` and `NAMES` (every variant and its word, table order), `name`, `Display` and
/// `FromStr` through that table, and [`string_conversions!`] for config.json. `unknown(s) = expr`
/// is the error for a word `s` that names no variant.
macro_rules! choice {
    (
        $(#[$meta:meta])*
        $vis:vis enum $ty:ident {
            $($(#[$vmeta:meta])* $variant:ident = $word:literal,)+
        }
        unknown($s:ident) = $unknown:expr;
    ) => {
        $(#[$meta])*
        $vis enum $ty {
            $($(#[$vmeta])* $variant,)+
        }

        impl $ty {
            /// Every variant, in table order.
            pub const ALL: [$ty; [$($word),+].len()] = [$($ty::$variant),+];
            /// Every variant's word, in table order.
            pub const NAMES: [&'static str; [$($word),+].len()] = [$($word),+];

            /// The word the command line and config.json use.
            pub fn name(self) -> &'static str {
                match self {
                    $($ty::$variant => $word,)+
                }
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $ty {
            type Err = $crate::error::Error;
            fn from_str($s: &str) -> $crate::error::Result<$ty> {
                match $s {
                    $($word => Ok($ty::$variant),)+
                    _ => Err($unknown),
                }
            }
        }

        $crate::error::string_conversions!($ty);
    };
}

pub(crate) use choice;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn or_list_reads_as_prose() {
        assert_eq!(or_list(&[]), "");
        assert_eq!(or_list(&["a"]), "a");
        assert_eq!(or_list(&["a", "b"]), "a or b");
        assert_eq!(or_list(&["a", "b", "c"]), "a, b or c");
    }
}
