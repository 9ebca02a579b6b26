//! Pipeline failure tests: nothing becomes visible in the store unless every check passes.

use super::*;
use crate::decrypt::testutil::ocicrypt_encrypt;
use crate::decrypt::LayerKey;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::sync::atomic::AtomicUsize;

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn tar_with(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in files {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

fn spec(
    blob: &[u8],
    compression: Compression,
    diff_id: String,
    key: Option<LayerKey>,
) -> LayerSpec {
    LayerSpec {
        digest: sha(blob),
        size: blob.len() as u64,
        compression,
        diff_id,
        key,
        budget: UnpackBudget::new(u64::MAX, "test"),
    }
}

async fn run(
    store: &Arc<LayerStore>,
    spec: LayerSpec,
    sent: Vec<u8>,
) -> Result<(PathBuf, bool), LayerError> {
    store
        .ensure_layer(spec, |tx| async move {
            for c in sent.chunks(1000) {
                if tx.send(Ok(Bytes::copy_from_slice(c))).await.is_err() {
                    return Err(crate::registry::RegistryError::ConsumerGone);
                }
            }
            Ok(())
        })
        .await
        .map(|(p, timings)| (p, timings.is_none()))
}

/// Pulls an uncompressed, unencrypted layer whose blob is `tar`.
async fn run_plain(store: &Arc<LayerStore>, tar: &[u8]) -> Result<(PathBuf, bool), LayerError> {
    run(
        store,
        spec(tar, Compression::None, sha(tar), None),
        tar.to_vec(),
    )
    .await
}

fn assert_nothing_visible(store: &LayerStore) {
    assert_eq!(
        std::fs::read_dir(store.root().join("layers"))
            .unwrap()
            .count(),
        0
    );
    assert_eq!(std::fs::read_dir(store.staging_dir()).unwrap().count(), 0);
}

#[tokio::test]
async fn gzip_multi_member_and_zstd_layers_unpack() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path()).unwrap();
    let tar = tar_with(&[("a.txt", b"hello"), ("b.txt", b"world")]);
    // Two gzip members: MultiGzDecoder must read both.
    let mut blob = gzip(&tar[..512]);
    blob.extend(gzip(&tar[512..]));
    let (p, cached) = run(
        &store,
        spec(&blob, Compression::Gzip, sha(&tar), None),
        blob.clone(),
    )
    .await
    .unwrap();
    assert!(!cached);
    assert_eq!(std::fs::read(p.join("b.txt")).unwrap(), b"world");
    let z = zstd::encode_all(&tar[..], 3).unwrap();
    let (p, _) = run(
        &store,
        spec(&z, Compression::Zstd, sha(&tar), None),
        z.clone(),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(p.join("a.txt")).unwrap(), b"hello");
    // Second request of the same digest is a cache hit.
    let (_, cached) = run(&store, spec(&z, Compression::Zstd, sha(&tar), None), vec![])
        .await
        .unwrap();
    assert!(cached);
}

#[tokio::test]
async fn truncated_blob_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path()).unwrap();
    let tar = tar_with(&[("a", &[7u8; 5000])]);
    let blob = gzip(&tar);
    let e = run(
        &store,
        spec(&blob, Compression::Gzip, sha(&tar), None),
        blob[..blob.len() - 10].to_vec(),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("truncated") || e.to_string().contains("layer"),
        "{e}"
    );
    assert_nothing_visible(&store);
}

#[tokio::test]
async fn wrong_blob_digest_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path()).unwrap();
    let tar = tar_with(&[("a", b"x")]);
    let blob = tar.clone();
    let mut corrupted = blob.clone();
    corrupted[600] ^= 0xff; // inside the file data: tar still parses
    let e = run(
        &store,
        spec(&blob, Compression::None, sha(&tar), None),
        corrupted,
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("blob digest mismatch"), "{e}");
    assert_nothing_visible(&store);
}

#[tokio::test]
async fn diff_id_mismatch_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path()).unwrap();
    let tar = tar_with(&[("a", b"x")]);
    let blob = gzip(&tar);
    let e = run(
        &store,
        spec(&blob, Compression::Gzip, sha(b"other"), None),
        blob.clone(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("diff_id mismatch"), "{e}");
    assert_nothing_visible(&store);
}

#[tokio::test]
async fn encrypted_zstd_layer_and_hmac_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path()).unwrap();
    let tar = tar_with(&[("secret.txt", b"plaintext")]);
    let z = zstd::encode_all(&tar[..], 3).unwrap();
    let (ct, plbco, pubopts) = ocicrypt_encrypt(&z, [5; 32], [6; 16], &sha(&z));
    let key = || LayerKey::from_opts("l", &plbco, Some(&pubopts)).unwrap();
    // Tampered ciphertext with a matching blob digest (as if the manifest were forged too):
    // only the HMAC catches it.
    let mut bad = ct.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    let e = run(
        &store,
        spec(&bad, Compression::Zstd, sha(&tar), Some(key())),
        bad.clone(),
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("HMAC"), "{e}");
    assert_nothing_visible(&store);
    let (p, _) = run(
        &store,
        spec(&ct, Compression::Zstd, sha(&tar), Some(key())),
        ct.clone(),
    )
    .await
    .unwrap();
    assert_eq!(std::fs::read(p.join("secret.txt")).unwrap(), b"plaintext");
}

#[tokio::test]
async fn plaintext_digest_from_private_options_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path()).unwrap();
    let tar = tar_with(&[("f", b"1")]);
    let (ct, plbco, pubopts) = ocicrypt_encrypt(&tar, [5; 32], [6; 16], &sha(b"not the layer"));
    let key = LayerKey::from_opts("l", &plbco, Some(&pubopts)).unwrap();
    let e = run(
        &store,
        spec(&ct, Compression::None, sha(&tar), Some(key)),
        ct.clone(),
    )
    .await
    .unwrap_err();
    assert!(
        e.to_string().contains("decrypted layer digest mismatch"),
        "{e}"
    );
    assert_nothing_visible(&store);
}

#[tokio::test]
async fn concurrent_requests_fetch_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path()).unwrap();
    let tar = tar_with(&[("a", &[1u8; 100_000])]);
    let blob = gzip(&tar);
    let fetches = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (store, blob, tar, fetches) =
            (store.clone(), blob.clone(), tar.clone(), fetches.clone());
        tasks.push(tokio::spawn(async move {
            store
                .ensure_layer(
                    spec(&blob, Compression::Gzip, sha(&tar), None),
                    |tx| async move {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        for c in blob.chunks(4096) {
                            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
                            tx.send(Ok(Bytes::copy_from_slice(c)))
                                .await
                                .map_err(|_| crate::registry::RegistryError::ConsumerGone)?;
                        }
                        Ok(())
                    },
                )
                .await
                .map(|(_, timings)| timings.is_none())
        }));
    }
    let mut hits = 0;
    for t in tasks {
        if t.await.unwrap().unwrap() {
            hits += 1;
        }
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 1);
    assert_eq!(hits, 3);
}

#[tokio::test]
async fn gc_keeps_referenced_and_pinned_layers() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path()).unwrap();
    let mut digests = Vec::new();
    for n in 0..3u8 {
        let tar = tar_with(&[("f", &[n])]);
        run(
            &store,
            spec(&tar, Compression::None, sha(&tar), None),
            tar.clone(),
        )
        .await
        .unwrap();
        digests.push(sha(&tar));
    }
    let referenced = vec![digests[0].clone()];
    let removed = {
        let s = store.clone();
        let _pin = store.pin(vec![digests[1].clone()]).await.unwrap();
        // The pin holds the shared store lock, so GC in this state must not run at all.
        let r = tokio::task::spawn_blocking(move || s.gc(|| panic!("GC ran under a pin")))
            .await
            .unwrap()
            .unwrap();
        assert!(r.is_empty());
        drop(_pin);
        store.gc(|| Ok(referenced)).unwrap()
    };
    let mut removed = removed;
    removed.sort();
    let mut expected = vec![digests[1].clone(), digests[2].clone()];
    expected.sort();
    assert_eq!(removed, expected);
    assert!(store.has_layer(&digests[0]));
    assert!(!store.has_layer(&digests[1]));
    assert!(!store.has_layer(&digests[2]));
}

#[tokio::test]
async fn a_pull_cancelled_mid_layer_leaves_no_staging() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path()).unwrap();
    let tar = tar_with(&[("big", &vec![5u8; 1 << 20])]);
    let s = spec(&tar, Compression::None, sha(&tar), None);
    let sent = tar.clone();
    // The caller's deadline drops the pull while the layer is half written (as ttrpc does
    // when kata-agent's image_pull_timeout expires).
    let pull = store.ensure_layer(s, |tx| async move {
        for c in sent[..sent.len() / 2].chunks(64 * 1024) {
            let _ = tx.send(Ok(Bytes::copy_from_slice(c))).await;
        }
        std::future::pending::<()>().await;
        Ok(())
    });
    let cancelled = tokio::time::timeout(std::time::Duration::from_millis(300), pull).await;
    assert!(
        cancelled.is_err(),
        "the pull should still have been running"
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while std::fs::read_dir(store.staging_dir()).unwrap().count() != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "staging still holds {:?}",
            std::fs::read_dir(store.staging_dir())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_nothing_visible(&store);
    // The same layer pulls fine afterwards.
    run_plain(&store, &tar).await.unwrap();
}

#[tokio::test]
async fn staging_of_dead_pulls_is_reclaimed_and_live_staging_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path()).unwrap();
    let base = dir.path().join("staging");
    // A dead process: its lock file is there but nobody holds the flock.
    std::fs::create_dir_all(base.join("1-2-3/sha256-aa.0")).unwrap();
    std::fs::write(base.join("1-2-3/sha256-aa.0/f"), vec![0u8; 4096]).unwrap();
    std::fs::write(base.join("1-2-3.lock"), b"").unwrap();
    // A layout older than the locks.
    std::fs::create_dir_all(base.join("sha256-bb.77.0")).unwrap();
    // A live one: another store instance on the same work dir (as another process would be).
    let live = LayerStore::open(dir.path()).unwrap();
    std::fs::write(live.staging_dir().join("in-progress"), b"x").unwrap();
    let tar = tar_with(&[("f", b"x")]);
    run_plain(&store, &tar).await.unwrap();
    // Reclaiming also runs in the background of every fetch; this waits for it.
    store.reclaim_staging();
    assert!(!base.join("1-2-3").exists() && !base.join("1-2-3.lock").exists());
    assert!(!base.join("sha256-bb.77.0").exists());
    assert!(live.staging_dir().join("in-progress").exists());
    assert!(store.staging_dir().is_dir());
    // A store that goes away cleanly removes its own staging and lock.
    let gone = live.staging_dir().to_owned();
    drop(live);
    assert!(!gone.exists() && !gone.with_extension("lock").exists());
    assert_eq!(store.reclaim_staging(), 0);
}

#[tokio::test]
async fn an_image_unpacking_past_its_budget_stops_early() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path()).unwrap();
    // 64 MiB of zeros gzip to ~64 KiB: a small bomb against a 1 MiB budget.
    let tar = tar_with(&[("zeros", &vec![0u8; 64 << 20])]);
    let blob = gzip(&tar);
    assert!(blob.len() < 1 << 20);
    let budget = UnpackBudget::new(1 << 20, "test budget");
    let mut s = spec(&blob, Compression::Gzip, sha(&tar), None);
    s.budget = budget.clone();
    let e = run(&store, s, blob.clone()).await.unwrap_err();
    match &e {
        LayerError::TooLarge { limit, why, .. } => {
            assert_eq!(*limit, 1 << 20);
            assert_eq!(*why, "test budget");
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    assert_nothing_visible(&store);
    // Two layers of one image share the budget: each fits alone, both do not.
    let a = tar_with(&[("a", &vec![1u8; 600 << 10])]);
    let b = tar_with(&[("b", &vec![2u8; 600 << 10])]);
    let budget = UnpackBudget::new(1 << 20, "shared");
    let mut sa = spec(&a, Compression::None, sha(&a), None);
    sa.budget = budget.clone();
    let mut sb = spec(&b, Compression::None, sha(&b), None);
    sb.budget = budget;
    run(&store, sa, a.clone()).await.unwrap();
    assert!(matches!(
        run(&store, sb, b.clone()).await,
        Err(LayerError::TooLarge { .. })
    ));
}

#[tokio::test]
async fn more_bytes_than_the_manifest_size_fail_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = LayerStore::open(dir.path()).unwrap();
    let tar = tar_with(&[("a", &[7u8; 5000])]);
    for size in [0u64, 100] {
        let mut s = spec(&tar, Compression::None, sha(&tar), None);
        s.size = size;
        let sent = Arc::new(AtomicUsize::new(0));
        let counted = sent.clone();
        let data = tar.clone();
        // The registry keeps sending after the descriptor's size; the pull must stop at it.
        let e = store
            .ensure_layer(s, |tx| async move {
                for c in data.chunks(100).cycle().take(10_000) {
                    if tx.send(Ok(Bytes::copy_from_slice(c))).await.is_err() {
                        return Err(crate::registry::RegistryError::ConsumerGone);
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                }
                Ok(())
            })
            .await
            .unwrap_err();
        assert!(
            matches!(&e, LayerError::Integrity { reason, .. } if reason.contains("larger than its descriptor size")),
            "size {size}: {e:?}"
        );
        assert!(
            sent.load(Ordering::SeqCst) < 100,
            "size {size}: read on after the size"
        );
        assert_nothing_visible(&store);
    }
}

#[tokio::test]
async fn a_removed_or_replaced_work_dir_is_laid_out_again() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("image");
    let store = LayerStore::open(&work).unwrap();
    assert!(!store.ensure_layout().unwrap(), "nothing changed yet");
    // kata-agent's CreateSandbox removes /run/kata-containers, the work dir with it.
    std::fs::remove_dir_all(&work).unwrap();
    let one = tar_with(&[("f", b"one")]);
    assert!(
        run_plain(&store, &one).await.is_err(),
        "without a new layout the store cannot stage"
    );
    assert!(store.ensure_layout().unwrap());
    let (p, cached) = run_plain(&store, &one).await.unwrap();
    assert!(!cached && p.starts_with(&work));
    assert_eq!(std::fs::read(p.join("f")).unwrap(), b"one");
    assert!(!store.ensure_layout().unwrap());

    // A filesystem mounted on the work dir: path lookups reach a new, empty directory and the
    // old tree is out of sight (played here by moving it away).
    let hidden = dir.path().join("hidden");
    std::fs::rename(&work, &hidden).unwrap();
    std::fs::create_dir(&work).unwrap();
    assert!(store.ensure_layout().unwrap());
    let staging = store.staging_dir();
    assert!(
        staging.starts_with(&work) && staging.is_dir(),
        "{staging:?}"
    );
    let two = tar_with(&[("g", b"two")]);
    let (p, cached) = run_plain(&store, &two).await.unwrap();
    assert!(!cached && p.starts_with(&work));
    // The layer pulled before is not in the new store: pulled again, not taken from the
    // hidden tree.
    let (p, cached) = run_plain(&store, &one).await.unwrap();
    assert!(!cached && p.starts_with(&work));
    assert!(!hidden
        .join("layers")
        .join(layer_dir_name(&sha(&two)))
        .exists());
    drop(store);
    assert_eq!(std::fs::read_dir(work.join("staging")).unwrap().count(), 0);
}
