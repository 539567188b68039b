//! SPDY/3.1 as spoken by moby/spdystream (the Go library behind kubectl,
//! crictl and the kubelet): just enough of the protocol to multiplex the
//! remotecommand and portforward streams over one upgraded connection.

mod dictionary;
pub(crate) mod frame;
pub(crate) mod headers;
pub(crate) mod session;

pub(crate) use session::{IncomingStream, Session};
