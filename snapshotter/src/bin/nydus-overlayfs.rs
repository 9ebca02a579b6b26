//! nydus-overlayfs: mount helper run by `mount.fuse` for `fuse.nydus-overlayfs` mounts.
//! Usage (as mount.fuse calls it): `nydus-overlayfs overlay <target> -o <options>`.

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Err(e) = snapshotter::overlay::run(&args) {
        eprintln!("nydus-overlayfs: {e}");
        std::process::exit(1);
    }
}
