//! Container setup from an OCI runtime spec.
