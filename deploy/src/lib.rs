//! guestpull-deploy: installs the guestpull snapshotter on a Kubernetes node and wires it into
//! containerd's config reversibly, from a privileged DaemonSet pod or by hand on the node.

pub mod edit;
pub mod error;
pub mod host;
pub mod install;
pub mod merge;

pub use error::DeployError;
pub use host::{Exec, Host};
pub use install::{install, uninstall, Options, Outcome, Removed, UninstallOptions};
