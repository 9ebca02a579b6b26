//! The harness itself works against the real components: a pushed image pulls and runs with
//! containerd's own overlayfs snapshotter on every containerd version.

use integration::{push_test_image, Containerd, ContainerdVersion, Lab, Registry};

#[test]
fn overlayfs_pull_and_run_on_every_containerd() {
    Lab::require_root();
    let lab = Lab::new("harness");
    let reg = Registry::start(&lab);
    let img = push_test_image(
        &reg,
        "lab/busybox:v1",
        2,
        &["/bin/sh", "-c", "cat /etc/hello.txt /etc/layer2.txt"],
    );
    assert_eq!(img.layer_digests.len(), 2);
    for v in ContainerdVersion::all() {
        let ctrd = Containerd::start(&lab, v, "");
        let mut pull = vec!["images", "pull", "--plain-http"];
        if v == ContainerdVersion::V2_1 {
            pull.push("--local");
        }
        pull.push(&img.reference);
        ctrd.ctr_ok(&pull);
        let out = ctrd.ctr_run(
            &[],
            &img.reference,
            &format!("h-{}", v.label().replace('.', "")),
            &[],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "ctr run on {}: {}",
            v.label(),
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            stdout,
            "hello from guestpull test image\nlayer 2\n",
            "containerd {}",
            v.label()
        );
        drop(ctrd);
        let _ = std::fs::remove_dir_all(lab.join("containerd"));
    }
    assert!(
        reg.blob_gets("lab/busybox") >= 3,
        "overlayfs pulls fetch layer blobs"
    );
}
