//! A client of a test server's HTTP routes: multipart uploads as a browser or curl sends
//! them, JSON answers, task polling and the Server-Sent Events of a task.

use std::time::Duration;

use reqwest::multipart::{Form, Part};
use reqwest::StatusCode;
use serde_json::Value;

pub struct Http {
    pub base: String,
    pub client: reqwest::Client,
}

impl Http {
    pub fn new(addr: std::net::SocketAddr) -> Self {
        Self::with_client(format!("http://{addr}"), reqwest::Client::new())
    }

    pub fn with_client(base: String, client: reqwest::Client) -> Self {
        Self { base, client }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn get(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path))
    }

    pub fn delete(&self, path: &str) -> reqwest::RequestBuilder {
        self.client.delete(self.url(path))
    }

    /// A form with the `options` fields first, then the picture in `image`.
    pub fn form(file_name: &str, bytes: Vec<u8>, options: &[(&str, &str)]) -> Form {
        let mut form = Form::new();
        for (k, v) in options {
            form = form.text(k.to_string(), v.to_string());
        }
        form.part("image", Part::bytes(bytes).file_name(file_name.to_string()))
    }

    pub async fn upload(
        &self,
        file_name: &str,
        bytes: Vec<u8>,
        options: &[(&str, &str)],
    ) -> reqwest::Response {
        self.post_form(Self::form(file_name, bytes, options)).await
    }

    pub async fn post_form(&self, form: Form) -> reqwest::Response {
        self.client
            .post(self.url("/upscale"))
            .multipart(form)
            .send()
            .await
            .expect("POST /upscale answers")
    }

    /// Polls `GET /tasks/{id}` until SUCCESS, FAILURE or CANCELLED.
    pub async fn wait_done(&self, task_id: &str) -> Value {
        let deadline = tokio::time::Instant::now() + super::server::wait_limit();
        loop {
            let (status, task) = json(self.get(&format!("/tasks/{task_id}")).send().await).await;
            assert_eq!(status, StatusCode::OK, "{task}");
            if matches!(
                task["state"].as_str(),
                Some("SUCCESS" | "FAILURE" | "CANCELLED")
            ) {
                return task;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "task {task_id} not done: {task}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every `task` event of `GET /tasks/{id}/events`, read until the server ends the stream.
    pub async fn events(&self, task_id: &str) -> Vec<Value> {
        let response = self
            .get(&format!("/tasks/{task_id}/events"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "{:?}",
            response.headers()
        );
        let text = tokio::time::timeout(super::server::wait_limit(), response.text())
            .await
            .expect("the event stream ends after the task does")
            .unwrap();
        sse_data(&text, "task")
    }
}

/// A GET sent as written over a fresh connection, so no client tidies the path first: the
/// status code and the whole answer (head and body).
pub fn raw_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let status = text[9..12].parse().unwrap();
    (status, text)
}

/// The JSON `data` of every event named `event` in a Server-Sent Events body.
pub fn sse_data(text: &str, event: &str) -> Vec<Value> {
    text.split("\n\n")
        .filter(|frame| frame.lines().any(|l| l == format!("event: {event}")))
        .map(|frame| {
            let data: Vec<&str> = frame
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            serde_json::from_str(&data.join("\n")).expect("event data is JSON")
        })
        .collect()
}

/// The status and JSON body of an answer.
pub async fn json(response: reqwest::Result<reqwest::Response>) -> (StatusCode, Value) {
    let response = response.expect("the server answers");
    let status = response.status();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{status}: body is not JSON: {text:?}"));
    (status, value)
}

/// Asserts the one error shape and returns its code and message.
pub fn error(status: StatusCode, body: &Value, expected: StatusCode) -> (String, String) {
    assert_eq!(status, expected, "{body}");
    let code = body["error"]["code"].as_str().expect("error.code");
    let message = body["error"]["message"].as_str().expect("error.message");
    assert!(!message.is_empty(), "{body}");
    (code.to_string(), message.to_string())
}
