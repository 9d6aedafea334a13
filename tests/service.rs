//! The gRPC service end to end, over real gRPC on 127.0.0.1, each scenario against the
//! embedded backends and against real Redis + a Mongo-wire server.

mod common;

use std::time::Duration;

use common::server::{self as srv, png, Backend, Place, Server};
use futures::StreamExt;
use tonic::Code;
use upscaler::api::pb;

on_both_backends!(
    not_found_task,
    task_without_file,
    task_with_bad_file,
    with_new_file,
    with_file_in_db,
    concurrent_upload_and_watch,
    restart_keeps_results_and_tasks,
    big_result_round_trips,
    full_queue_is_refused_cleanly,
);

async fn not_found_task(place: Place) {
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    let (code, msg) = srv::code(
        c.get_task(pb::GetTaskRequest {
            task_id: "no-such-task".into(),
        })
        .await,
    );
    assert_eq!(code, Code::NotFound, "{msg}");
    let (code, _) = srv::code(
        c.watch_task(pb::WatchTaskRequest {
            task_id: "no-such-task".into(),
        })
        .await,
    );
    assert_eq!(code, Code::NotFound);
    let (code, _) = srv::code(srv::fetch(&mut c, "never-uploaded.png").await);
    assert_eq!(code, Code::NotFound);
    let (code, _) = srv::code(
        c.get_task(pb::GetTaskRequest {
            task_id: String::new(),
        })
        .await,
    );
    assert_eq!(code, Code::InvalidArgument);
    server.stop().await;
}

async fn task_without_file(place: Place) {
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    // Metadata but no bytes.
    let (code, msg) = srv::code(srv::upload(&mut c, srv::meta("empty.png"), b"").await);
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    assert!(msg.contains("no image bytes"), "{msg}");
    // Bytes but no metadata.
    let (code, msg) = srv::code(srv::upload_parts(&mut c, None, &png(8, 8, 1), 1024).await);
    assert_eq!(code, Code::InvalidArgument, "{msg}");
    // Nothing at all.
    let (code, _) = srv::code(srv::upload_parts(&mut c, None, b"", 1).await);
    assert_eq!(code, Code::InvalidArgument);
    // Metadata without a name.
    let (code, _) = srv::code(srv::upload(&mut c, srv::meta(""), &png(8, 8, 1)).await);
    assert_eq!(code, Code::InvalidArgument);
    assert_nothing_left(&place, &mut c, "empty.png").await;
    server.stop().await;
}

async fn task_with_bad_file(place: Place) {
    let mut settings = place.settings();
    settings.max_upload_bytes = 200_000;
    settings.max_pixels = 100 * 100;
    let server = Server::start_with(settings).await;
    let mut c = server.client.clone();
    let good = png(16, 16, 3);
    let cases: Vec<(pb::UploadMetadata, Vec<u8>, Code, &str)> = vec![
        (
            srv::meta("notes.png"),
            b"just some text, not an image".to_vec(),
            Code::InvalidArgument,
            "not a PNG or JPEG image",
        ),
        (
            srv::meta("photo.jpg"),
            good.clone(),
            Code::InvalidArgument,
            "says JPEG",
        ),
        (
            srv::meta("cut.png"),
            good[..good.len() - 30].to_vec(),
            Code::InvalidArgument,
            "cannot decode",
        ),
        (
            srv::meta("../escape.png"),
            good.clone(),
            Code::InvalidArgument,
            "..",
        ),
        (
            srv::meta("dir/name.png"),
            good.clone(),
            Code::InvalidArgument,
            "path separator",
        ),
        (
            srv::meta("bell\u{7}.png"),
            good.clone(),
            Code::InvalidArgument,
            "control",
        ),
        (
            srv::meta("image.gif"),
            good.clone(),
            Code::InvalidArgument,
            ".png, .jpg",
        ),
        (
            pb::UploadMetadata {
                model: "nope".into(),
                ..srv::meta("m.png")
            },
            good.clone(),
            Code::InvalidArgument,
            "unknown model",
        ),
        (
            pb::UploadMetadata {
                outscale: Some(-1.0),
                ..srv::meta("o.png")
            },
            good.clone(),
            Code::InvalidArgument,
            "outscale",
        ),
        (
            srv::meta("wide.png"),
            png(101, 100, 3),
            Code::ResourceExhausted,
            "over the limit",
        ),
        (
            srv::meta("heavy.png"),
            // A valid small PNG padded with junk: only the byte limit is wrong.
            {
                let mut b = png(8, 8, 4);
                b.resize(300_000, 0);
                b
            },
            Code::ResourceExhausted,
            "over the limit of 200000 bytes",
        ),
    ];
    for (meta, bytes, want, needle) in cases {
        let name = meta.file_name.clone();
        let (code, msg) = srv::code(srv::upload(&mut c, meta, &bytes).await);
        assert_eq!(code, want, "{name}: {msg}");
        assert!(msg.contains(needle), "{name}: `{msg}` lacks `{needle}`");
    }
    // The size limit is enforced while streaming: a client still sending gets refused.
    let endless = futures::stream::iter(
        std::iter::once(pb::UploadImageRequest {
            payload: Some(pb::upload_image_request::Payload::Metadata(srv::meta(
                "stream.png",
            ))),
        })
        .chain(std::iter::once(pb::UploadImageRequest {
            payload: Some(pb::upload_image_request::Payload::Chunk(png(8, 8, 4))),
        }))
        .chain((0..10_000).map(|_| pb::UploadImageRequest {
            payload: Some(pb::upload_image_request::Payload::Chunk(vec![
                0x89;
                64 * 1024
            ])),
        })),
    );
    let (code, msg) = srv::code(c.upload_image(endless).await);
    assert_eq!(code, Code::ResourceExhausted, "{msg}");
    for name in [
        "notes.png",
        "cut.png",
        "wide.png",
        "heavy.png",
        "stream.png",
    ] {
        assert_nothing_left(&place, &mut c, name).await;
    }
    server.stop().await;
}

/// No temp file, no record of an unfinished task, and the name is free (a new upload of it
/// is queued rather than reported in progress).
async fn assert_nothing_left(place: &Place, c: &mut srv::Client, name: &str) {
    assert!(
        place.temp_files().is_empty(),
        "temp files left: {:?}",
        place.temp_files()
    );
    let leftover = common::server::unfinished_tasks(place).await;
    assert!(leftover.is_empty(), "task records left: {leftover:?}");
    let r = srv::upload(c, srv::meta(name), &png(8, 8, 9))
        .await
        .unwrap();
    assert_eq!(
        srv::outcome(&r),
        pb::UploadOutcome::Queued,
        "{name} was still locked"
    );
    let t = srv::wait_done(c, &r.task_id).await;
    assert_eq!(srv::state(&t), pb::TaskState::Success);
}

async fn with_new_file(place: Place) {
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    let r = srv::upload(&mut c, srv::meta("new.png"), &png(24, 16, 5))
        .await
        .unwrap();
    assert_eq!(srv::outcome(&r), pb::UploadOutcome::Queued);
    assert_eq!(r.file_name, "new.png");
    let t = srv::wait_done(&mut c, &r.task_id).await;
    assert_eq!(srv::state(&t), pb::TaskState::Success, "{}", t.error);
    assert_eq!(
        (
            t.input_width,
            t.input_height,
            t.output_width,
            t.output_height
        ),
        (24, 16, 96, 64)
    );
    assert_eq!(t.model, "realesr-animevideov3");
    assert!(t.created_at.is_some() && t.started_at.is_some() && t.finished_at.is_some());
    let (meta, bytes, largest) = srv::fetch(&mut c, "new.png").await.unwrap();
    assert!(largest <= 1 << 20);
    assert_eq!(meta.size as usize, bytes.len());
    assert_eq!(meta.content_type, "image/png");
    assert_eq!(meta.task_id, r.task_id);
    assert_eq!(
        meta.sha256,
        upscaler::tasks::types::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes))
    );
    let img = image::load_from_memory(&bytes).unwrap();
    assert_eq!(
        (img.width(), img.height(), meta.width, meta.height),
        (96, 64, 96, 64)
    );
    assert!(
        place.temp_files().is_empty(),
        "source not deleted: {:?}",
        place.temp_files()
    );
    server.stop().await;
}

async fn with_file_in_db(place: Place) {
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    let bytes = png(20, 12, 7);
    let first = srv::upload(&mut c, srv::meta("db.png"), &bytes)
        .await
        .unwrap();
    assert_eq!(
        srv::state(&srv::wait_done(&mut c, &first.task_id).await),
        pb::TaskState::Success
    );
    let again = srv::upload(&mut c, srv::meta("db.png"), &bytes)
        .await
        .unwrap();
    assert_eq!(srv::outcome(&again), pb::UploadOutcome::AlreadyProcessed);
    assert_eq!(again.task_id, first.task_id);
    let (_, fetched, _) = srv::fetch(&mut c, "db.png").await.unwrap();
    assert_eq!(image::load_from_memory(&fetched).unwrap().width(), 80);
    // Same name, other bytes: refused unless overwrite is set.
    let other = png(20, 12, 8);
    let (code, _) = srv::code(srv::upload(&mut c, srv::meta("db.png"), &other).await);
    assert_eq!(code, Code::AlreadyExists);
    let jpeg = pb::UploadMetadata {
        output_format: pb::OutputFormat::Jpeg as i32,
        ..srv::meta("db.png")
    };
    let (code, _) = srv::code(srv::upload(&mut c, jpeg, &bytes).await);
    assert_eq!(
        code,
        Code::AlreadyExists,
        "other options count as other work"
    );
    let over = srv::upload(
        &mut c,
        pb::UploadMetadata {
            overwrite: true,
            ..srv::meta("db.png")
        },
        &other,
    )
    .await
    .unwrap();
    assert_eq!(srv::outcome(&over), pb::UploadOutcome::Queued);
    assert_eq!(
        srv::state(&srv::wait_done(&mut c, &over.task_id).await),
        pb::TaskState::Success
    );
    let (meta, _, _) = srv::fetch(&mut c, "db.png").await.unwrap();
    assert_eq!(meta.task_id, over.task_id, "the result was replaced");
    server.stop().await;
}

async fn concurrent_upload_and_watch(place: Place) {
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    let bytes = png(128, 96, 11);
    let tiled = pb::UploadMetadata {
        tile: Some(32),
        ..srv::meta("busy.png")
    };
    let first = srv::upload(&mut c, tiled.clone(), &bytes).await.unwrap();
    assert_eq!(srv::outcome(&first), pb::UploadOutcome::Queued);
    let mut updates = c
        .watch_task(pb::WatchTaskRequest {
            task_id: first.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let second = srv::upload(&mut c, tiled, &bytes).await.unwrap();
    assert_eq!(srv::outcome(&second), pb::UploadOutcome::InProgress);
    assert_eq!(second.task_id, first.task_id);

    let mut seen = Vec::new();
    while let Some(t) = tokio::time::timeout(srv::wait_limit(), updates.next())
        .await
        .expect("updates keep coming")
    {
        seen.push(t.unwrap());
    }
    let last = seen.last().expect("at least one update");
    assert_eq!(srv::state(last), pb::TaskState::Success);
    assert_eq!(last.tiles_total, 12, "4 x 3 tiles of 32");
    assert_eq!(last.tiles_done, 12);
    assert!(
        seen.windows(2).all(|w| w[0].tiles_done <= w[1].tiles_done),
        "progress went back"
    );
    assert!(
        seen.iter()
            .any(|t| srv::state(t) == pb::TaskState::Started && t.tiles_done > 0),
        "no progress seen: {seen:?}"
    );
    server.stop().await;
}

async fn restart_keeps_results_and_tasks(place: Place) {
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    let bytes = png(16, 16, 13);
    let r = srv::upload(&mut c, srv::meta("keep.png"), &bytes)
        .await
        .unwrap();
    assert_eq!(
        srv::state(&srv::wait_done(&mut c, &r.task_id).await),
        pb::TaskState::Success
    );
    let (_, before, _) = srv::fetch(&mut c, "keep.png").await.unwrap();
    server.stop().await;

    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    let t = c
        .get_task(pb::GetTaskRequest {
            task_id: r.task_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(srv::state(&t), pb::TaskState::Success);
    assert_eq!(t.file_name, "keep.png");
    let (_, after, _) = srv::fetch(&mut c, "keep.png").await.unwrap();
    assert_eq!(before, after);
    let again = srv::upload(&mut c, srv::meta("keep.png"), &bytes)
        .await
        .unwrap();
    assert_eq!(srv::outcome(&again), pb::UploadOutcome::AlreadyProcessed);
    server.stop().await;
}

async fn big_result_round_trips(place: Place) {
    // Over MongoDB's 16 MB document limit: the bytes must go through GridFS.
    let big: Vec<u8> = (0..17 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    common::server::store_result(&place, "huge.png", big.clone()).await;
    let server = Server::start(&place).await;
    let mut c = server.client.clone();
    let (meta, bytes, largest) = srv::fetch(&mut c, "huge.png").await.unwrap();
    assert_eq!(meta.size as usize, big.len());
    assert!(largest <= 1 << 20, "chunk of {largest} bytes");
    assert!(bytes == big, "bytes differ after the round trip");
    server.stop().await;
}

async fn full_queue_is_refused_cleanly(place: Place) {
    let mut settings = place.settings();
    settings.queue_capacity = 1;
    let server = Server::start_with(settings).await;
    let mut c = server.client.clone();
    let bytes = png(96, 96, 17);
    let mut refused = Vec::new();
    let mut accepted = Vec::new();
    for i in 0..4 {
        let name = format!("q{i}.png");
        match srv::upload(
            &mut c,
            pb::UploadMetadata {
                tile: Some(32),
                ..srv::meta(&name)
            },
            &bytes,
        )
        .await
        {
            Ok(r) => accepted.push(r.task_id),
            Err(s) => {
                assert_eq!(s.code(), Code::ResourceExhausted, "{}", s.message());
                refused.push(name);
            }
        }
    }
    assert!(!refused.is_empty(), "a queue of one never filled");
    for id in &accepted {
        assert_eq!(
            srv::state(&srv::wait_done(&mut c, id).await),
            pb::TaskState::Success
        );
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    for name in &refused {
        assert_nothing_left(&place, &mut c, name).await;
    }
    server.stop().await;
}
