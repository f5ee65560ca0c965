//! One module per protocol service, each owning its state and its frames
//! (the event loop in crate::agent only routes frames and epoll events).

pub mod exec;
pub mod files;
pub mod freeze;
pub mod logs;
pub mod mounts;
pub mod net;
pub mod session;
pub mod tcp;
pub mod volumes;
pub mod workload;
