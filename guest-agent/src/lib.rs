//! The guest agent. It will link `vmrun-container` to build containers inside the microVM.
