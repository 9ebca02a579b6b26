//! The named images the tests, benchmarks and demo use.

use std::path::Path;

use crate::layer::{Compression, Layer, Node};
use crate::layout::ImageSpec;

/// The busybox applets linked in every image.
pub const APPLETS: &[&str] = &[
    "sh",
    "ls",
    "cat",
    "echo",
    "sleep",
    "mount",
    "uname",
    "id",
    "find",
    "stat",
    "sha256sum",
    "wc",
    "head",
    "test",
    "[",
];

/// What the demo and run tests expect a catalog image to print.
pub const HELLO: &str = "hello from guestpull test image\n";

/// The base layer: a static busybox, its applets and `/etc/hello.txt`.
pub fn base_layer(busybox: &Path, c: Compression) -> std::io::Result<Layer> {
    let bb = std::fs::read(busybox)?;
    let mut nodes = vec![
        Node::dir("bin"),
        Node::dir("etc"),
        Node::Dir {
            path: "tmp".into(),
            mode: 0o1777,
        },
        Node::File {
            path: "bin/busybox".into(),
            data: bb,
            mode: 0o755,
            uid: 0,
            gid: 0,
        },
    ];
    for a in APPLETS {
        nodes.push(Node::symlink(&format!("bin/{a}"), "busybox"));
    }
    nodes.push(Node::file("etc/hello.txt", HELLO));
    nodes.push(Node::file(
        "etc/passwd",
        "root:x:0:0:root:/root:/bin/sh\nguest:x:1000:1000:guest:/home/guest:/bin/sh\n",
    ));
    nodes.push(Node::file("etc/group", "root:x:0:\nguest:x:1000:\n"));
    Ok(Layer {
        nodes,
        compression: c,
    })
}

/// Layers exercising every entry kind the unpacker must handle: hardlinks, symlinks, special
/// files, ownership, setuid, xattrs, then whiteouts and an opaque directory on top.
pub fn feature_layers(c: Compression) -> Vec<Layer> {
    let l2 = Layer {
        nodes: vec![
            Node::dir("data"),
            Node::dir("data/keep"),
            Node::file("data/keep/a.txt", "keep a\n"),
            Node::dir("data/replace"),
            Node::file("data/replace/old.txt", "old\n"),
            Node::file("data/removed.txt", "to be removed\n"),
            Node::File {
                path: "data/owned.txt".into(),
                data: b"owned by guest\n".to_vec(),
                mode: 0o640,
                uid: 1000,
                gid: 1000,
            },
            Node::File {
                path: "data/setuid".into(),
                data: b"#!/bin/sh\n".to_vec(),
                mode: 0o4755,
                uid: 0,
                gid: 0,
            },
            Node::Hardlink {
                path: "data/keep/a-hardlink.txt".into(),
                target: "data/keep/a.txt".into(),
            },
            Node::symlink("data/rel-link", "keep/a.txt"),
            Node::symlink("data/abs-link", "/etc/hello.txt"),
            Node::Fifo {
                path: "data/fifo".into(),
                mode: 0o644,
            },
            Node::CharDev {
                path: "data/null".into(),
                major: 1,
                minor: 3,
                mode: 0o666,
            },
            Node::XattrFile {
                path: "data/xattr.txt".into(),
                data: b"has xattr\n".to_vec(),
                xattrs: vec![("user.guestpull".into(), b"yes".to_vec())],
            },
        ],
        compression: c,
    };
    let l3 = Layer {
        nodes: vec![
            Node::dir("data"),
            Node::Whiteout {
                path: "data/removed.txt".into(),
            },
            Node::dir("data/replace"),
            Node::Opaque {
                dir: "data/replace".into(),
            },
            Node::file("data/replace/new.txt", "new\n"),
            Node::file("etc/layer3.txt", "layer 3\n"),
        ],
        compression: c,
    };
    vec![l2, l3]
}

/// Deterministic, partly compressible filler (like real binaries: ~2:1 under gzip).
pub fn filler(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        // xorshift64*: cheap and reproducible; alternate random and repetitive runs.
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D);
        if (v >> 60) & 1 == 0 {
            out.extend_from_slice(&v.to_le_bytes());
        } else {
            out.extend_from_slice(b"guestpull-filler-text");
        }
    }
    out.truncate(len);
    out
}

/// A list of catalog image names with a one-line description each.
pub fn names() -> &'static [(&'static str, &'static str)] {
    &[
        ("busybox", "one gzip layer: busybox + /etc/hello.txt; prints the hello line"),
        ("layers3", "three gzip layers (base + /etc/layer2.txt + /etc/layer3.txt)"),
        ("features-gzip", "base + hardlinks, symlinks, devices, fifo, setuid, owners, xattrs, whiteouts, opaque dir (gzip)"),
        ("features-zstd", "the same as features-gzip with zstd layers"),
        ("features-uncompressed", "the same as features-gzip with uncompressed layers"),
        ("multiarch", "an image index: linux/amd64 and linux/arm64/v8, /etc/platform.txt differs"),
        ("pause", "the busybox layer, sleeping: the pod sandbox (pause) image of the CRI tests"),
        ("large", "base + N filler layers of --large-mb MiB in total (benchmarks)"),
    ]
}

/// The spec of catalog image `name` (for `multiarch`, the amd64 member; see [`multiarch`]).
pub fn spec(name: &str, busybox: &Path, large_mb: usize) -> std::io::Result<Option<ImageSpec>> {
    let hello = ["/bin/sh", "-c", "cat /etc/hello.txt"];
    Ok(Some(match name {
        "busybox" => ImageSpec::new(vec![base_layer(busybox, Compression::Gzip)?], &hello),
        // The same layer as `busybox`: shared blobs and snapshots, as a real pause image shares
        // nothing but costs little. CRI stops the sandbox with SIGKILL, so sleep suffices.
        "pause" => ImageSpec::new(
            vec![base_layer(busybox, Compression::Gzip)?],
            &["/bin/sleep", "2147483647"],
        ),
        "layers3" => {
            let mut layers = vec![base_layer(busybox, Compression::Gzip)?];
            for n in 2..=3 {
                layers.push(Layer {
                    nodes: vec![
                        Node::dir("etc"),
                        Node::file(&format!("etc/layer{n}.txt"), format!("layer {n}\n")),
                    ],
                    compression: Compression::Gzip,
                });
            }
            ImageSpec::new(
                layers,
                &[
                    "/bin/sh",
                    "-c",
                    "cat /etc/hello.txt /etc/layer2.txt /etc/layer3.txt",
                ],
            )
        }
        "features-gzip" | "features-zstd" | "features-uncompressed" => {
            let c = match name {
                "features-gzip" => Compression::Gzip,
                "features-zstd" => Compression::Zstd,
                _ => Compression::None,
            };
            let mut layers = vec![base_layer(busybox, c)?];
            layers.extend(feature_layers(c));
            ImageSpec::new(
                layers,
                &["/bin/sh", "-c", "cat /etc/hello.txt /data/replace/new.txt"],
            )
        }
        "large" => {
            let mut layers = vec![base_layer(busybox, Compression::Gzip)?];
            let per_layer_files = 16;
            let n_layers = 4;
            let file_len = (large_mb << 20) / (n_layers * per_layer_files);
            for l in 0..n_layers {
                let mut nodes = vec![Node::dir("payload"), Node::dir(&format!("payload/l{l}"))];
                for f in 0..per_layer_files {
                    nodes.push(Node::file(
                        &format!("payload/l{l}/f{f}.bin"),
                        filler((l * per_layer_files + f) as u64, file_len),
                    ));
                }
                nodes.push(Node::file(
                    &format!("payload/l{l}/small.txt"),
                    format!("small file in layer {l}\n"),
                ));
                layers.push(Layer {
                    nodes,
                    compression: Compression::Gzip,
                });
            }
            ImageSpec::new(layers, &hello)
        }
        _ => return Ok(None),
    }))
}

/// The two members of the `multiarch` index: (amd64, arm64/v8).
pub fn multiarch(busybox: &Path) -> std::io::Result<(ImageSpec, ImageSpec)> {
    let member = |arch: &str, variant: &str| -> std::io::Result<ImageSpec> {
        let mut s = ImageSpec::new(
            vec![
                base_layer(busybox, Compression::Gzip)?,
                Layer {
                    nodes: vec![
                        Node::dir("etc"),
                        Node::file("etc/platform.txt", format!("linux/{arch}\n")),
                    ],
                    compression: Compression::Gzip,
                },
            ],
            &["/bin/sh", "-c", "cat /etc/platform.txt"],
        );
        s.architecture = arch.into();
        s.variant = variant.into();
        Ok(s)
    };
    Ok((member("amd64", "")?, member("arm64", "v8")?))
}
