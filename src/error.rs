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

/// The one place domain errors become gRPC statuses.
impl From<Error> for tonic::Status {
    fn from(e: Error) -> Self {
        match e {
            Error::NotFound(m) => tonic::Status::not_found(m),
            Error::AlreadyExists(m) => tonic::Status::already_exists(m),
            Error::FailedPrecondition(m) => tonic::Status::failed_precondition(m),
            Error::InvalidArgument(m) => tonic::Status::invalid_argument(m),
            Error::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "internal error");
                tonic::Status::internal(format!("{e:#}"))
            }
        }
    }
}
