//! The errors callers branch on, and their one mapping to gRPC status codes.

use std::fmt;

/// What went wrong, in the terms of containerd's snapshotter contract.
///
/// Every variant but `Internal` is the client's doing and maps to a specific
/// gRPC code; `Internal` carries the chain of causes for the log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// Not something ontop does; containerd's diff service then tries
    /// the next applier in its list.
    #[error("{0}")]
    Unimplemented(String),
    #[error("{0:#}")]
    Internal(anyhow::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn not_found(what: impl fmt::Display) -> Self {
        Error::NotFound(what.to_string())
    }
    pub fn already_exists(what: impl fmt::Display) -> Self {
        Error::AlreadyExists(what.to_string())
    }
    pub fn failed_precondition(what: impl fmt::Display) -> Self {
        Error::FailedPrecondition(what.to_string())
    }
    pub fn invalid_argument(what: impl fmt::Display) -> Self {
        Error::InvalidArgument(what.to_string())
    }
    pub fn unimplemented(what: impl fmt::Display) -> Self {
        Error::Unimplemented(what.to_string())
    }
}

impl From<anyhow::Error> for Error {
    fn from(e: anyhow::Error) -> Self {
        Error::Internal(e)
    }
}

impl From<rusqlite::Error> for Error {
    fn from(e: rusqlite::Error) -> Self {
        Error::Internal(anyhow::Error::new(e).context("metadata database"))
    }
}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Error::Internal(e.into())
    }
}

/// Whether `e` comes from a full filesystem or quota (ENOSPC, EDQUOT),
/// by way of the OS or SQLite.
fn out_of_space(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT));
        }
        if let Some(rusqlite::Error::SqliteFailure(f, _)) = cause.downcast_ref::<rusqlite::Error>()
        {
            return f.code == rusqlite::ErrorCode::DiskFull;
        }
        false
    })
}

/// The one place domain errors become gRPC statuses.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::NotFound(m) => tonic::Status::not_found(m),
            Error::AlreadyExists(m) => tonic::Status::already_exists(m),
            Error::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            Error::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            Error::Unimplemented(m) => tonic::Status::unimplemented(m),
            // A full disk is the node's state, not a bug: say so, so that
            // the operator and containerd's retries can tell.
            Error::Internal(e) if out_of_space(&e) => {
                tracing::warn!(error = format!("{e:#}"), "out of space");
                tonic::Status::resource_exhausted(format!("{e:#}"))
            }
            Error::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                tonic::Status::internal(format!("{e:#}"))
            }
        }
    }
}
