//! Unit tests of the stream state machine.

use super::*;

fn stream() -> Stream {
    Stream::for_test(64 * 1024)
}

fn payloads(t: Take) -> (Vec<Vec<u8>>, bool) {
    match t {
        Take::Frames(f) => (f.into_iter().map(|f| f.payload.to_vec()).collect(), false),
        Take::Last(f) => (f.into_iter().map(|f| f.payload.to_vec()).collect(), true),
        _ => panic!("unexpected take"),
    }
}

#[test]
fn output_before_attach_is_kept_in_order() {
    let s = stream();
    s.push_output(Channel::Stdout, Bytes::from_static(b"a"));
    s.push_output(Channel::Stderr, Bytes::from_static(b"b"));
    let n = s.attach().unwrap();
    assert_eq!(
        payloads(s.take(n)),
        (vec![b"a".to_vec(), b"b".to_vec()], false)
    );
}

#[test]
fn exit_waits_for_stdout_eof() {
    let s = stream();
    let n = s.attach().unwrap();
    assert!(!s.exited(3));
    assert_eq!(payloads(s.take(n)), (vec![], false));
    s.push_output(Channel::Stdout, Bytes::from_static(b"late"));
    s.stdout_eof();
    let (frames, last) = payloads(s.take(n));
    assert!(last);
    assert_eq!(frames, vec![b"late".to_vec(), 3i32.to_be_bytes().to_vec()]);
}

#[test]
fn second_attach_is_busy_and_release_restores_frames() {
    let s = stream();
    let n = s.attach().unwrap();
    assert_eq!(s.attach(), Err(AttachError::Busy));
    s.push_output(Channel::Stdout, Bytes::from_static(b"x"));
    let Take::Frames(frames) = s.take(n) else {
        panic!()
    };
    s.release(n, frames);
    let m = s.attach().unwrap();
    assert!(matches!(s.take(n), Take::Superseded));
    assert_eq!(payloads(s.take(m)), (vec![b"x".to_vec()], false));
}

#[test]
fn full_buffer_reports_backpressure() {
    let s = stream();
    assert!(s.push_output(Channel::Stdout, Bytes::from(vec![0u8; 32 * 1024])));
    assert!(!s.push_output(Channel::Stdout, Bytes::from(vec![0u8; 32 * 1024])));
    let n = s.attach().unwrap();
    let _ = s.take(n);
    assert_eq!(s.buffered(), 0);
}

#[test]
fn closed_stream_refuses_attach_and_drops_output() {
    let s = stream();
    s.close();
    assert_eq!(s.attach(), Err(AttachError::Closed));
    assert!(s.push_output(Channel::Stdout, Bytes::from_static(b"gone")));
    assert_eq!(s.buffered(), 0);
}

#[test]
fn frames_released_into_a_closed_stream_are_dropped_not_counted_as_buffered() {
    let s = stream();
    s.push_output(Channel::Stdout, Bytes::from(vec![0u8; 1000]));
    let n = s.attach().unwrap();
    let Take::Frames(frames) = s.take(n) else {
        panic!()
    };
    s.close();
    s.release(n, frames);
    assert_eq!(s.buffered(), 0);
}

#[test]
fn a_pending_exit_after_a_failure_adds_no_second_last_frame() {
    let s = stream();
    let n = s.attach().unwrap();
    assert!(!s.exited(0));
    s.fail("VM lost");
    s.flush_pending_exit();
    s.stdout_eof();
    let (frames, last) = match s.take(n) {
        Take::Last(f) => (f, true),
        Take::Frames(f) => (f, false),
        _ => panic!(),
    };
    assert!(last);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].channel, Channel::Error);
}
