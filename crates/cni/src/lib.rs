//! CNI 1.0 client for pod networking (work in progress, see issue 11).
