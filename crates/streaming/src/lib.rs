//! The CRI streaming server (work in progress, see issue 11).
