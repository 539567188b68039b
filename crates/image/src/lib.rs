//! OCI image store.
