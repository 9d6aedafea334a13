//! Contract tests of the storage and lock backends: each behaviour is written once against
//! the traits and run on the embedded/in-memory backends and on real MongoDB and Redis.
//!
//! Real servers come from `UPSCALER_TEST_MONGO_URI` and `UPSCALER_TEST_REDIS_URL`. Unset, those
//! tests print SKIPPED, except under `CI`, where a missing server must fail the build rather
//! than quietly test less. Each test uses its own database / key prefix.

use std::collections::BTreeSet;
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use upscaler::locks::{memory::MemoryLocks, redis::RedisLocks, Acquire, LockManager};
use upscaler::store::{
    embedded::EmbeddedStore, mongo::MongoStore, Fence, Lease, LocalSources, ResultStore,
    SourceStore, StoreError, TaskQueue, TaskStore, CHUNK_SIZE,
};
use upscaler::tasks::types::{
    JobOptions, Replaces, ResultFormat, ResultMeta, TaskRecord, TaskState,
};

const MONGO_VAR: &str = "UPSCALER_TEST_MONGO_URI";
const REDIS_VAR: &str = "UPSCALER_TEST_REDIS_URL";
const MIB: usize = 1 << 20;

// ---------------------------------------------------------------- fixtures

fn server(var: &str) -> Option<String> {
    match std::env::var(var) {
        Ok(value) if !value.trim().is_empty() => Some(value),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{var} is not set: CI must run the backend tests against a real server")
        }
        _ => {
            // Straight to the process's stderr: libtest would swallow `eprintln!` of a
            // passing test, and a skip must be seen.
            let line =
                format!("\n***** SKIPPED: no real server; set {var} to run this test *****\n");
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            None
        }
    }
}

fn unique() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

fn task(state: TaskState, expires_at_ms: Option<i64>) -> TaskRecord {
    TaskRecord {
        id: uuid::Uuid::new_v4().to_string(),
        state,
        file_name: format!("{}.png", unique()),
        options: JobOptions {
            model: "RealESRGAN_x4plus".into(),
            outscale: Some(2.5),
            tile: None,
            format: ResultFormat::Png,
        },
        source_sha256: "ab".repeat(32),
        tiles_done: 0,
        tiles_total: 4,
        error: None,
        input_width: 64,
        input_height: 48,
        output_width: 256,
        output_height: 192,
        created_at_ms: 1_700_000_000_000,
        started_at_ms: None,
        finished_at_ms: state.is_terminal().then_some(1_700_000_100_000),
        expires_at_ms,
        cancel_requested: false,
        queue_position: 0,
        run: 0,
        replaces: Replaces::Nothing,
    }
}

fn meta(file_name: &str, bytes: &[u8]) -> ResultMeta {
    ResultMeta {
        file_name: file_name.into(),
        content_type: "image/png".into(),
        size: bytes.len() as u64,
        width: 256,
        height: 192,
        sha256: unique(),
        fingerprint: unique(),
        model: "RealESRGAN_x4plus".into(),
        task_id: unique(),
        created_at_ms: 1_700_000_000_000,
        run: 0,
    }
}

/// These store tests replace freely; the fencing rules have their own test.
const ANY: &Replaces = &Replaces::Any;

/// Incompressible test bytes without a `rand` dependency (xorshift64*).
fn random_bytes(len: usize) -> Vec<u8> {
    let mut state = uuid::Uuid::new_v4().as_u64_pair().0 | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Reads a stored result back, checking the chunk-size contract on the way.
async fn read_back(store: &dyn ResultStore, name: &str) -> Option<(ResultMeta, Vec<u8>)> {
    let (meta, mut chunks) = store.open(name).await.expect("open")?;
    let mut bytes = Vec::new();
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.expect("chunk");
        assert!(
            !chunk.is_empty() && chunk.len() <= CHUNK_SIZE,
            "chunk of {}",
            chunk.len()
        );
        bytes.extend_from_slice(&chunk);
    }
    Some((meta, bytes))
}

// ---------------------------------------------------------------- behaviours

async fn task_lifecycle(store: &dyn TaskStore) {
    let mut t = task(TaskState::Pending, None);
    assert!(store.get(&t.id).await.unwrap().is_none());
    store.insert(&t).await.unwrap();
    assert_eq!(store.get(&t.id).await.unwrap().as_ref(), Some(&t));

    let again = store.insert(&t).await;
    assert!(
        matches!(again, Err(StoreError::Duplicate(ref id)) if *id == t.id),
        "{again:?}"
    );

    t.state = TaskState::Success;
    t.tiles_done = 4;
    t.finished_at_ms = Some(1_700_000_200_000);
    t.expires_at_ms = Some(1_700_600_000_000);
    t.error = Some("not really".into());
    store.put(&t).await.unwrap();
    assert_eq!(store.get(&t.id).await.unwrap().as_ref(), Some(&t));

    let fresh = task(TaskState::Started, None);
    store.put(&fresh).await.unwrap();
    assert_eq!(store.get(&fresh.id).await.unwrap().as_ref(), Some(&fresh));

    store.delete(&t.id).await.unwrap();
    assert!(store.get(&t.id).await.unwrap().is_none());
    store.delete(&t.id).await.unwrap();
    assert_eq!(store.get(&fresh.id).await.unwrap().as_ref(), Some(&fresh));
}

async fn unfinished_tasks(store: &dyn TaskStore) {
    // Records other behaviours left behind may be listed too: compare against a baseline.
    let before: BTreeSet<String> = unfinished_ids(store).await;
    let pending = task(TaskState::Pending, None);
    let started = task(TaskState::Started, None);
    for t in [&pending, &started] {
        store.insert(t).await.unwrap();
    }
    for state in [TaskState::Success, TaskState::Failure] {
        store.insert(&task(state, Some(i64::MAX))).await.unwrap();
    }
    let mut expected = before;
    expected.extend([pending.id.clone(), started.id]);
    assert_eq!(unfinished_ids(store).await, expected);

    let mut done = pending;
    done.state = TaskState::Success;
    TaskStore::put(store, &done).await.unwrap();
    expected.remove(&done.id);
    assert_eq!(unfinished_ids(store).await, expected);
}

async fn unfinished_ids(store: &dyn TaskStore) -> BTreeSet<String> {
    let tasks = store.unfinished().await.unwrap();
    assert!(tasks.iter().all(|t| !t.state.is_terminal()), "{tasks:?}");
    tasks.into_iter().map(|t| t.id).collect()
}

async fn result_roundtrip(store: &dyn ResultStore) {
    let name = format!("{}.png", unique());
    assert!(store.meta(&name).await.unwrap().is_none());
    assert!(read_back(store, &name).await.is_none());

    let first = random_bytes(2 * MIB + 12345);
    let first_meta = meta(&name, &first);
    store
        .put(&first_meta, first.clone(), ANY, &Fence::NONE)
        .await
        .unwrap();
    assert_eq!(store.meta(&name).await.unwrap().as_ref(), Some(&first_meta));
    let (got_meta, got) = read_back(store, &name).await.unwrap();
    assert_eq!(got_meta, first_meta);
    assert!(got == first, "first result differs");

    let second = random_bytes(MIB / 3);
    let second_meta = meta(&name, &second);
    store
        .put(&second_meta, second.clone(), ANY, &Fence::NONE)
        .await
        .unwrap();
    assert_eq!(
        store.meta(&name).await.unwrap().as_ref(),
        Some(&second_meta)
    );
    let (got_meta, got) = read_back(store, &name).await.unwrap();
    assert_eq!(got_meta, second_meta);
    assert!(got == second, "replaced result differs");

    let empty_name = format!("{}.png", unique());
    store
        .put(&meta(&empty_name, &[]), Vec::new(), ANY, &Fence::NONE)
        .await
        .unwrap();
    assert_eq!(
        read_back(store, &empty_name).await.unwrap().1,
        Vec::<u8>::new()
    );

    let mut lying = meta(&name, &first);
    lying.size += 1;
    assert!(
        store.put(&lying, first, ANY, &Fence::NONE).await.is_err(),
        "size mismatch accepted"
    );
    assert_eq!(read_back(store, &name).await.unwrap().1, second);
}

async fn large_result(store: &dyn ResultStore) {
    let name = format!("{}.png", unique());
    let bytes = random_bytes(17 * MIB);
    store
        .put(&meta(&name, &bytes), bytes.clone(), ANY, &Fence::NONE)
        .await
        .unwrap();
    let (_, mut chunks) = store.open(&name).await.unwrap().unwrap();
    let (mut got, mut count) = (Vec::new(), 0);
    while let Some(chunk) = chunks.next().await {
        let chunk = chunk.unwrap();
        assert!(chunk.len() <= CHUNK_SIZE);
        got.extend_from_slice(&chunk);
        count += 1;
    }
    assert_eq!(count, 17);
    assert!(got == bytes, "17 MiB result differs");
}

/// Readers racing a writer that keeps replacing one result see one version or the other.
async fn replace_while_reading(store: &dyn ResultStore) {
    let name = format!("{}.png", unique());
    let versions = [random_bytes(MIB + 7), random_bytes(2 * MIB + 3)];
    store
        .put(
            &meta(&name, &versions[0]),
            versions[0].clone(),
            ANY,
            &Fence::NONE,
        )
        .await
        .unwrap();
    let writer = async {
        for i in 1..=10 {
            let bytes = &versions[i % 2];
            store
                .put(&meta(&name, bytes), bytes.clone(), ANY, &Fence::NONE)
                .await
                .unwrap();
        }
    };
    let reader = async {
        for _ in 0..10 {
            let (meta, bytes) = read_back(store, &name).await.expect("result vanished");
            assert!(versions.contains(&bytes), "read a mix of versions");
            assert_eq!(meta.size, bytes.len() as u64);
        }
    };
    futures::join!(writer, reader);
}

/// The result write is a compare-and-swap: a task replaces only what it was admitted to
/// replace, or an earlier run of its own; anything else is `Conflict` and changes nothing.
async fn fenced_result_writes(store: &dyn ResultStore) {
    let name = format!("{}.png", unique());
    let write = |task: &str, run: u64, bytes: &[u8]| {
        let mut m = meta(&name, bytes);
        m.task_id = task.to_string();
        m.run = run;
        m
    };
    let (a, b) = (unique(), unique());
    let conflict = |r: Result<(), StoreError>| matches!(r, Err(StoreError::Conflict(_)));
    let first = random_bytes(1000);
    let nothing = &Replaces::Nothing;
    store
        .put(&write(&a, 1, &first), first.clone(), nothing, &Fence::NONE)
        .await
        .unwrap();
    // Admitted when nothing was stored, while A stored meanwhile: refused.
    let late = random_bytes(900);
    assert!(conflict(
        store
            .put(&write(&b, 1, &late), late.clone(), nothing, &Fence::NONE)
            .await
    ));
    // A's own later run may replace A's result; B admitted to replace A's may.
    let rerun = random_bytes(800);
    store
        .put(&write(&a, 2, &rerun), rerun.clone(), nothing, &Fence::NONE)
        .await
        .unwrap();
    let newest = random_bytes(700);
    let over_a = &Replaces::Result(a.clone());
    store
        .put(&write(&b, 1, &newest), newest.clone(), over_a, &Fence::NONE)
        .await
        .unwrap();
    // A stale run of A, and a stale run of B, come too late.
    assert!(conflict(
        store
            .put(&write(&a, 2, &rerun), rerun.clone(), nothing, &Fence::NONE)
            .await
    ));
    let mut stale_b = write(&b, 0, &late);
    stale_b.created_at_ms += 1;
    assert!(conflict(
        store
            .put(&stale_b, late.clone(), nothing, &Fence::NONE)
            .await
    ));
    let (m, bytes) = read_back(store, &name).await.unwrap();
    assert_eq!((m.task_id.as_str(), m.run), (b.as_str(), 1));
    assert_eq!(bytes, newest);
}

/// Deleting a result (plain, and only while it is still a given task's), listing the old
/// ones for expiry, and the totals. Needs a store with no other results.
async fn result_deletion_and_expiry(store: &dyn ResultStore) {
    let (old_name, young_name) = (format!("{}.png", unique()), format!("{}.png", unique()));
    let (old_bytes, young_bytes) = (random_bytes(MIB + 5), random_bytes(1000));
    let mut old = meta(&old_name, &old_bytes);
    old.created_at_ms = 1_000;
    let mut young = meta(&young_name, &young_bytes);
    young.created_at_ms = 5_000;
    store
        .put(&young, young_bytes.clone(), ANY, &Fence::NONE)
        .await
        .unwrap();
    store
        .put(&old, old_bytes.clone(), ANY, &Fence::NONE)
        .await
        .unwrap();
    assert_eq!(
        store.usage().await.unwrap(),
        (2, (old_bytes.len() + young_bytes.len()) as u64)
    );
    let names = |v: Vec<ResultMeta>| v.into_iter().map(|m| m.file_name).collect::<Vec<_>>();
    assert_eq!(
        names(store.stored_before(1_000, 10).await.unwrap()),
        Vec::<String>::new()
    );
    assert_eq!(
        names(store.stored_before(2_000, 10).await.unwrap()),
        [old_name.as_str()]
    );
    assert_eq!(
        names(store.stored_before(9_000, 10).await.unwrap()),
        [old_name.clone(), young_name.clone()],
        "oldest first"
    );
    assert_eq!(
        names(store.stored_before(9_000, 1).await.unwrap()),
        [old_name.as_str()]
    );

    // Made by another task (replaced since it was found): kept.
    assert_eq!(
        store.delete(&old_name, Some("another-task")).await.unwrap(),
        None
    );
    assert!(read_back(store, &old_name).await.is_some());
    // Several sweepers at once: exactly one deletes it.
    let (a, b) = futures::join!(
        store.delete(&old_name, Some(&old.task_id)),
        store.delete(&old_name, Some(&old.task_id))
    );
    let deleted: Vec<_> = [a.unwrap(), b.unwrap()].into_iter().flatten().collect();
    assert_eq!(deleted, [old.clone()]);
    assert!(store.meta(&old_name).await.unwrap().is_none());
    assert!(read_back(store, &old_name).await.is_none());
    assert_eq!(store.delete(&old_name, None).await.unwrap(), None);
    assert_eq!(store.usage().await.unwrap(), (1, young_bytes.len() as u64));

    // Unconditionally, as DeleteProcessed does; the name can be stored again after.
    assert_eq!(
        store.delete(&young_name, None).await.unwrap(),
        Some(young.clone())
    );
    assert_eq!(store.usage().await.unwrap(), (0, 0));
    store
        .put(&young, young_bytes.clone(), ANY, &Fence::NONE)
        .await
        .unwrap();
    assert_eq!(read_back(store, &young_name).await.unwrap().1, young_bytes);
}

/// Uploads listed by age for the orphan sweep, and deletion that says whether it deleted.
async fn source_sweep(sources: &dyn SourceStore, scratch: &std::path::Path) {
    let id = uuid::Uuid::new_v4().to_string();
    let file = scratch.join("upload.part");
    std::fs::write(&file, b"some image bytes").unwrap();
    sources.put_source(&id, &file).await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    assert!(sources
        .sources_before(now + 60_000, 100)
        .await
        .unwrap()
        .contains(&id));
    assert!(!sources
        .sources_before(now - 60_000, 100)
        .await
        .unwrap()
        .contains(&id));
    assert_eq!(
        sources.source(&id).await.unwrap().as_deref(),
        Some(&b"some image bytes"[..])
    );
    assert!(sources.delete_source(&id).await.unwrap(), "deleted");
    assert!(!sources.delete_source(&id).await.unwrap(), "already gone");
    assert!(sources.source(&id).await.unwrap().is_none());
    assert!(!sources
        .sources_before(now + 60_000, 100)
        .await
        .unwrap()
        .contains(&id));
}

async fn lock_contract(locks: &dyn LockManager) {
    let name = format!("{}.png", unique());
    let ttl = Duration::from_secs(30);
    assert_eq!(locks.holder(&name).await.unwrap(), None);
    assert_eq!(
        locks.acquire(&name, "a", ttl).await.unwrap(),
        Acquire::Acquired
    );
    assert_eq!(locks.holder(&name).await.unwrap().as_deref(), Some("a"));
    assert_eq!(
        locks.acquire(&name, "b", ttl).await.unwrap(),
        Acquire::HeldBy("a".into())
    );
    assert!(locks.renew(&name, "a", ttl).await.unwrap());
    assert!(!locks.renew(&name, "b", ttl).await.unwrap());
    assert!(!locks.release(&name, "b").await.unwrap());
    assert_eq!(locks.holder(&name).await.unwrap().as_deref(), Some("a"));
    assert!(locks.release(&name, "a").await.unwrap());
    assert_eq!(locks.holder(&name).await.unwrap(), None);
    assert!(!locks.release(&name, "a").await.unwrap());
    assert!(!locks.renew(&name, "a", ttl).await.unwrap());
    assert_eq!(
        locks.acquire(&name, "b", ttl).await.unwrap(),
        Acquire::Acquired
    );
    assert!(locks.release(&name, "b").await.unwrap());
}

/// A lock nobody renews frees itself after `ttl`; its old holder can no longer touch it.
async fn lock_expiry(locks: &dyn LockManager, ttl: Duration) {
    let name = format!("{}.png", unique());
    assert_eq!(
        locks.acquire(&name, "a", ttl).await.unwrap(),
        Acquire::Acquired
    );
    tokio::time::sleep(ttl * 2).await;
    assert_eq!(locks.holder(&name).await.unwrap(), None);
    assert!(!locks.renew(&name, "a", ttl).await.unwrap());
    assert_eq!(
        locks.acquire(&name, "b", ttl).await.unwrap(),
        Acquire::Acquired
    );
    assert!(!locks.release(&name, "a").await.unwrap());
    assert_eq!(locks.holder(&name).await.unwrap().as_deref(), Some("b"));
}

/// Renewing pushes the expiry out: the lock outlives its first TTL.
async fn lock_renewal(locks: &dyn LockManager) {
    let name = format!("{}.png", unique());
    let ttl = Duration::from_millis(1000);
    assert_eq!(
        locks.acquire(&name, "a", ttl).await.unwrap(),
        Acquire::Acquired
    );
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(locks.renew(&name, "a", ttl).await.unwrap());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(locks.holder(&name).await.unwrap().as_deref(), Some("a"));
    assert!(locks.release(&name, "a").await.unwrap());
}

// ---------------------------------------------------------------- embedded / in-memory

#[tokio::test]
async fn embedded_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(&dir.path().join("data")).unwrap();
    task_lifecycle(&store).await;
    unfinished_tasks(&store).await;
}

#[tokio::test]
async fn embedded_purges_expired_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let old = task(TaskState::Success, Some(1_000));
    let young = task(TaskState::Failure, Some(3_000));
    let forever = task(TaskState::Pending, None);
    for t in [&old, &young, &forever] {
        store.insert(t).await.unwrap();
    }
    assert_eq!(store.purge_expired(2_000).await.unwrap(), 1);
    assert!(store.get(&old.id).await.unwrap().is_none());
    assert!(store.get(&young.id).await.unwrap().is_some());
    assert!(store.get(&forever.id).await.unwrap().is_some());
    assert_eq!(store.purge_expired(2_000).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_results() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    result_roundtrip(&store).await;
    large_result(&store).await;
    replace_while_reading(&store).await;
    fenced_result_writes(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_result_deletion_and_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    result_deletion_and_expiry(&store).await;
}

#[tokio::test]
async fn local_sources_sweep() {
    let dir = tempfile::tempdir().unwrap();
    let sources = LocalSources::new(dir.path().join("tmp"));
    std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
    source_sweep(&sources, dir.path()).await;
}

#[tokio::test]
async fn embedded_names_never_reach_the_file_system() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = EmbeddedStore::open(&root).unwrap();
    let mut evil = task(TaskState::Pending, None);
    evil.id = "../../escaped".into();
    store.insert(&evil).await.unwrap();
    let bytes = random_bytes(1000);
    for _ in 0..2 {
        ResultStore::put(
            &store,
            &meta("../escaped.png", &bytes),
            bytes.clone(),
            ANY,
            &Fence::NONE,
        )
        .await
        .unwrap();
    }
    assert_eq!(store.get("../../escaped").await.unwrap(), Some(evil));

    let outside: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(
        outside.len(),
        1,
        "files written outside the store: {outside:?}"
    );
    let mut blobs = 0;
    for sub in ["tasks", "results"] {
        for entry in std::fs::read_dir(root.join(sub)).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            let hash = name.split('.').next().unwrap();
            assert!(
                hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
                "{name}"
            );
            blobs += usize::from(name.ends_with(".blob"));
        }
    }
    assert_eq!(blobs, 1, "the replaced blob was not deleted");
}

#[tokio::test]
async fn embedded_ignores_and_sweeps_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let t = task(TaskState::Started, None);
    store.insert(&t).await.unwrap();
    let stray_task = dir.path().join("tasks/.tmp-crashed");
    let stray_result = dir.path().join("results/.tmp-crashed");
    let orphan_blob = dir
        .path()
        .join(format!("results/{}.{}.blob", "0".repeat(64), unique()));
    for path in [&stray_task, &stray_result, &orphan_blob] {
        std::fs::write(path, b"{ torn").unwrap();
    }
    let ids: Vec<String> = store
        .unfinished()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(ids, vec![t.id.clone()]);
    assert_eq!(store.purge_expired(i64::MAX).await.unwrap(), 0);

    drop(store);
    let reopened = EmbeddedStore::open(dir.path()).unwrap();
    for path in [&stray_task, &stray_result, &orphan_blob] {
        assert!(!path.exists(), "{} survived reopening", path.display());
    }
    assert_eq!(reopened.get(&t.id).await.unwrap(), Some(t));
}

#[tokio::test]
async fn memory_locks() {
    let locks = MemoryLocks::new();
    lock_contract(&locks).await;
    // Real time: the crate's tokio lacks the `test-util` feature that `time::pause` needs.
    lock_expiry(&locks, Duration::from_millis(50)).await;
    lock_renewal(&locks).await;
}

// ---------------------------------------------------------------- real servers

/// Runs `body` against a fresh database, dropping it afterwards even if `body` panics.
async fn with_mongo<F, Fut>(body: F)
where
    F: FnOnce(MongoStore, mongodb::Database) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let Some(uri) = server(MONGO_VAR) else { return };
    let name = format!("upscaler_test_{}", unique());
    let store = MongoStore::connect(&uri, &name, Duration::from_secs(3600))
        .await
        .unwrap_or_else(|e| panic!("{MONGO_VAR}: {e}"));
    let db = mongodb::Client::with_uri_str(&uri)
        .await
        .unwrap()
        .database(&name);
    let outcome = AssertUnwindSafe(body(store, db.clone()))
        .catch_unwind()
        .await;
    db.drop().await.unwrap();
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[tokio::test]
async fn mongo_tasks() {
    with_mongo(|store, db| async move {
        task_lifecycle(&store).await;
        unfinished_tasks(&store).await;

        let tasks = db.collection::<mongodb::bson::Document>("tasks");
        let mut cursor = tasks.list_indexes().await.unwrap();
        let mut ttl_index = None;
        while let Some(index) = cursor.next().await {
            let index = index.unwrap();
            if index.keys == mongodb::bson::doc! { "expires_at": 1 } {
                ttl_index = index.options.and_then(|o| o.expire_after);
            }
        }
        assert_eq!(
            ttl_index,
            Some(Duration::ZERO),
            "no TTL index on expires_at"
        );

        // The TTL index only acts on BSON dates: check the field really is one.
        let dated = task(TaskState::Success, Some(1_700_000_300_000));
        let undated = task(TaskState::Failure, None);
        for t in [&dated, &undated] {
            TaskStore::put(&store, t).await.unwrap();
        }
        let expires_at = |id: String| {
            let tasks = tasks.clone();
            async move {
                let doc = tasks
                    .find_one(mongodb::bson::doc! { "_id": id })
                    .await
                    .unwrap()
                    .unwrap();
                doc.get_datetime("expires_at").unwrap().timestamp_millis()
            }
        };
        assert_eq!(expires_at(dated.id.clone()).await, 1_700_000_300_000);
        let finished = undated.finished_at_ms.unwrap();
        assert_eq!(expires_at(undated.id.clone()).await, finished + 3_600_000);
        assert_eq!(store.get(&dated.id).await.unwrap(), Some(dated));
    })
    .await;
}

#[tokio::test]
async fn mongo_results() {
    with_mongo(|store, db| async move {
        result_roundtrip(&store).await;
        large_result(&store).await;
        replace_while_reading(&store).await;
        fenced_result_writes(&store).await;
        // Replaced and refused blobs are kept for the grace period, then swept: one GridFS
        // file per stored result remains.
        let results = db.collection::<mongodb::bson::Document>("results");
        let files = db.collection::<mongodb::bson::Document>("results.files");
        let stored = results
            .count_documents(mongodb::bson::doc! {})
            .await
            .unwrap();
        let count = || files.count_documents(mongodb::bson::doc! {});
        assert!(count().await.unwrap() > stored);
        assert_eq!(
            store.sweep_blobs(Duration::from_secs(3600)).await.unwrap(),
            0
        );
        assert!(store.sweep_blobs(Duration::ZERO).await.unwrap() > 0);
        assert_eq!(count().await.unwrap(), stored);
    })
    .await;
}

/// A store that restarts between a result's upload and its swap may have lost the uploaded
/// bytes (acknowledged, not yet durable). The writer checks them before the swap and uploads
/// them again, so the document never names bytes that are not there. The loss is made here
/// by the writer's last check before the swap, which deletes the blob it just uploaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_result_bytes_lost_before_the_swap_are_written_again() {
    with_mongo(|store, db| async move {
        let name = format!("{}.png", unique());
        let bytes = random_bytes(600 * 1024 + 5);
        let lose_upload = {
            let db = db.clone();
            Fence::new(move || {
                let db = db.clone();
                Box::pin(async move {
                    use mongodb::bson::doc;
                    let files = db.collection::<mongodb::bson::Document>("results.files");
                    let chunks = db.collection::<mongodb::bson::Document>("results.chunks");
                    let blob = files.find_one(doc! {}).await.unwrap().unwrap();
                    let id = blob.get_object_id("_id").unwrap();
                    // Part of the chunks, as a server that flushed some of them.
                    chunks
                        .delete_one(doc! { "files_id": id, "n": 1 })
                        .await
                        .unwrap();
                    Ok(())
                })
            })
        };
        ResultStore::put(
            &store,
            &meta(&name, &bytes),
            bytes.clone(),
            ANY,
            &lose_upload,
        )
        .await
        .unwrap();
        assert!(
            read_back(&store, &name).await.unwrap().1 == bytes,
            "the stored result reads back whole"
        );
        // The broken upload is left pending for the sweeper, which deletes it.
        assert_eq!(store.sweep_blobs(Duration::ZERO).await.unwrap(), 1);
        assert!(read_back(&store, &name).await.unwrap().1 == bytes);
    })
    .await;
}

/// A fetch that is streaming a large result when a new one replaces it (and a sweep runs)
/// still gets every byte of the version it opened: the old bytes outlive the swap by the
/// grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_streaming_fetch_survives_a_replacement() {
    with_mongo(|store, db| async move {
        let name = format!("{}.png", unique());
        // Well past what one server reply carries (16 MiB), so most of it is read after
        // the swap.
        let old = random_bytes(40 * MIB + 11);
        ResultStore::put(&store, &meta(&name, &old), old.clone(), ANY, &Fence::NONE)
            .await
            .unwrap();
        let (_, mut chunks) = store.open(&name).await.unwrap().unwrap();
        let mut read = chunks.next().await.unwrap().unwrap();
        let new = random_bytes(MIB);
        ResultStore::put(&store, &meta(&name, &new), new.clone(), ANY, &Fence::NONE)
            .await
            .unwrap();
        assert_eq!(
            store.sweep_blobs(Duration::from_secs(600)).await.unwrap(),
            0
        );
        // Kept whole, not only readable through this cursor: a server whose cursors hold
        // their own copy would stream it even after a delete.
        let count = |coll: &str| {
            let coll = db.collection::<mongodb::bson::Document>(coll);
            async move { coll.count_documents(mongodb::bson::doc! {}).await.unwrap() }
        };
        let old_chunks = (40 * MIB + 11).div_ceil(255 * 1024) as u64;
        let new_chunks = MIB.div_ceil(255 * 1024) as u64;
        assert_eq!(count("results.files").await, 2);
        assert_eq!(count("results.chunks").await, old_chunks + new_chunks);
        while let Some(chunk) = chunks.next().await {
            read.extend(chunk.expect("the old version stays readable"));
        }
        assert!(read == old, "got the whole old version");
        assert_eq!(read_back(&store, &name).await.unwrap().1, new);
        // Past the grace period the old version goes, and only it.
        assert_eq!(store.sweep_blobs(Duration::ZERO).await.unwrap(), 1);
        assert_eq!(count("results.files").await, 1);
        assert_eq!(count("results.chunks").await, new_chunks);
        assert_eq!(read_back(&store, &name).await.unwrap().1, new);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mongo_result_deletion_and_expiry() {
    with_mongo(|store, db| async move {
        result_deletion_and_expiry(&store).await;
        // Deleted results' blobs go with the next sweep past the grace period.
        store.sweep_blobs(Duration::ZERO).await.unwrap();
        let files = db.collection::<mongodb::bson::Document>("results.files");
        assert_eq!(
            files.count_documents(mongodb::bson::doc! {}).await.unwrap(),
            1
        );
        let dir = tempfile::tempdir().unwrap();
        source_sweep(&store, dir.path()).await;
    })
    .await;
}

/// The shared queue's cancellation and positions: a mark that a lease holder sees on its
/// next save or renewal, an unclaimed task ended by the canceller alone, and places in claim
/// order that skip claimed and cancelled tasks.
#[tokio::test]
async fn mongo_queue_cancel_and_positions() {
    with_mongo(|store, _db| async move {
        let lease = Duration::from_secs(60);
        let mut waiting = Vec::new();
        for i in 0..3 {
            let mut t = task(TaskState::Pending, None);
            t.created_at_ms = 1_700_000_000_000 + i;
            store.insert(&t).await.unwrap();
            waiting.push(t);
        }
        let mut places = Vec::new();
        for t in &waiting {
            places.push(store.position(t).await.unwrap());
        }
        assert_eq!(places, [1, 2, 3]);
        assert_eq!(store.waiting().await.unwrap(), 3);

        // A worker claims the oldest: the others move up.
        let claimed = store.claim("worker-a", lease).await.unwrap().unwrap();
        assert_eq!(claimed.id, waiting[0].id);
        assert!(!claimed.cancel_requested);
        assert_eq!(claimed.run, 1, "the first claim is run 1");
        assert_eq!(store.position(&waiting[1]).await.unwrap(), 1);
        assert_eq!(store.position(&waiting[2]).await.unwrap(), 2);

        // Cancelling the claimed task: marked, but not ended by the canceller; the holder
        // learns of it from its next save or renewal.
        let marked = store.request_cancel(&claimed.id).await.unwrap().unwrap();
        assert!(marked.cancel_requested);
        let mut ended = marked.clone();
        ended.state = TaskState::Cancelled;
        assert!(
            !store.cancel_unclaimed(&ended).await.unwrap(),
            "a leased task was ended"
        );
        assert_eq!(
            store
                .renew_lease(&claimed.id, claimed.run, lease)
                .await
                .unwrap(),
            Lease::CancelRequested
        );
        assert_eq!(
            store.put_leased(&claimed, claimed.run).await.unwrap(),
            Lease::CancelRequested,
            "saving a record does not clear the mark"
        );
        assert_eq!(
            store
                .renew_lease(&claimed.id, claimed.run + 1, lease)
                .await
                .unwrap(),
            Lease::Lost,
            "another run's token does not hold it"
        );

        // Cancelling a waiting task: the canceller ends it, and it is never claimed.
        let marked = store.request_cancel(&waiting[1].id).await.unwrap().unwrap();
        assert!(marked.cancel_requested);
        assert_eq!(
            store.position(&waiting[2]).await.unwrap(),
            1,
            "a cancelled task is not ahead"
        );
        let mut ended = marked;
        ended.state = TaskState::Cancelled;
        ended.finished_at_ms = Some(1_700_000_100_000);
        assert!(store.cancel_unclaimed(&ended).await.unwrap());
        let stored = store.get(&waiting[1].id).await.unwrap().unwrap();
        assert_eq!(stored.state, TaskState::Cancelled);
        assert!(!stored.cancel_requested);
        // Finished tasks come back unmarked, as they are.
        let again = store.request_cancel(&waiting[1].id).await.unwrap().unwrap();
        assert_eq!(
            (again.state, again.cancel_requested),
            (TaskState::Cancelled, false)
        );
        assert!(store
            .request_cancel("no-such-task")
            .await
            .unwrap()
            .is_none());

        let next = store.claim("worker-b", lease).await.unwrap().unwrap();
        assert_eq!(next.id, waiting[2].id, "the cancelled task was skipped");
        assert!(store.claim("worker-b", lease).await.unwrap().is_none());
        assert_eq!(store.waiting().await.unwrap(), 0);
    })
    .await;
}

/// Each claim raises the record's run; once a lease lapses (by the server's clock) and the
/// task is claimed again, the earlier run can neither renew, save nor give it back.
#[tokio::test]
async fn mongo_claims_fence_earlier_runs() {
    with_mongo(|store, _db| async move {
        let t = task(TaskState::Pending, None);
        store.insert(&t).await.unwrap();
        let first = store
            .claim("a", Duration::from_millis(300))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(first.run, 1);
        assert!(
            store
                .claim("b", Duration::from_secs(60))
                .await
                .unwrap()
                .is_none(),
            "a live lease is not taken"
        );
        tokio::time::sleep(Duration::from_millis(600)).await;
        let second = store
            .claim("b", Duration::from_secs(60))
            .await
            .unwrap()
            .unwrap();
        assert_eq!((second.id.as_str(), second.run), (t.id.as_str(), 2));
        let lease = Duration::from_secs(60);
        assert_eq!(
            store.renew_lease(&t.id, 1, lease).await.unwrap(),
            Lease::Lost
        );
        let mut stale = first.clone();
        stale.state = TaskState::Success;
        assert_eq!(store.put_leased(&stale, 1).await.unwrap(), Lease::Lost);
        assert!(!store.unlease(&stale, 1).await.unwrap());
        assert_eq!(
            store.get(&t.id).await.unwrap().unwrap().state,
            TaskState::Pending
        );
        assert_eq!(
            store.renew_lease(&t.id, 2, lease).await.unwrap(),
            Lease::Held
        );
        let found = store.unfinished_named(&t.file_name).await.unwrap().unwrap();
        assert_eq!(found.id, t.id);
        assert!(store.unfinished_named("other.png").await.unwrap().is_none());
    })
    .await;
}

#[tokio::test]
async fn redis_locks() {
    let Some(url) = server(REDIS_VAR) else { return };
    let locks = RedisLocks::connect(&url, &format!("upscaler-test-{}", unique()))
        .await
        .unwrap_or_else(|e| panic!("{REDIS_VAR}: {e}"));
    lock_contract(&locks).await;
    lock_expiry(&locks, Duration::from_millis(300)).await;
    lock_renewal(&locks).await;
}

// ---------------------------------------------------------------- unreachable servers

#[tokio::test]
async fn unreachable_servers_fail_fast_without_leaking_passwords() {
    let started = Instant::now();
    let mongo = MongoStore::connect(
        "mongodb://app:hunter2@127.0.0.1:1/?directConnection=true",
        "upscaler",
        Duration::from_secs(60),
    )
    .await;
    let Err(StoreError::Unavailable(why)) = mongo else {
        panic!("expected Unavailable, got {:?}", mongo.map(|_| ()))
    };
    assert!(
        !why.contains("hunter2") && why.contains("127.0.0.1:1"),
        "{why}"
    );

    let redis = RedisLocks::connect("redis://:hunter2@127.0.0.1:1", "upscaler").await;
    let Err(upscaler::locks::LockError::Unavailable(why)) = redis else {
        panic!("expected Unavailable from Redis")
    };
    assert!(
        !why.contains("hunter2") && why.contains("127.0.0.1:1"),
        "{why}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}
