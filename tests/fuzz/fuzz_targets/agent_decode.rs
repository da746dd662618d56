//! Fuzzes the SSH agent decoder: frames from an arbitrary byte stream, then each frame body
//! as a request and as a response. Nothing may panic, and whatever decodes must re-encode to
//! a message that decodes to the same value.
#![no_main]

use kmsbastion::agent::proto::{read_frame, Request, Response};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut stream = data;
    while let Ok(Some(body)) = read_frame(&mut stream) {
        if let Ok(request) = Request::decode(&body) {
            let again = Request::decode(&request.encode()).expect("re-encoded request decodes");
            assert_eq!(again, request);
        }
        if let Ok(response) = Response::decode(&body) {
            let again = Response::decode(&response.encode()).expect("re-encoded response decodes");
            assert_eq!(again, response);
        }
    }
    let _ = Request::decode(data);
    let _ = Response::decode(data);
});
