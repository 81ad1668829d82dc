//! The control actor over an in-memory channel (`tokio::io::duplex`): the test plays the agent.

use std::time::Duration;

use bytes::Bytes;
use cc_proxy_protocol::{code, ControlCodec, ControlFrame, Dialect};
use futures::{SinkExt, StreamExt};
use tokio::io::{DuplexStream, ReadHalf, WriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite};

use super::*;
use crate::vm::testing;

/// The agent's end of the control channel.
struct Agent {
    rx: FramedRead<ReadHalf<DuplexStream>, ControlCodec>,
    tx: FramedWrite<WriteHalf<DuplexStream>, ControlCodec>,
}

impl Agent {
    /// The next command the actor sends; fails the test if none comes within a second.
    async fn command(&mut self) -> ControlFrame {
        match tokio::time::timeout(Duration::from_secs(5), self.rx.next()).await {
            Ok(Some(Ok(f))) => f,
            other => panic!(
                "expected a command, got {:?}",
                other.map(|o| o.map(|r| r.is_ok()))
            ),
        }
    }

    /// Assert that nothing is sent for `wait`.
    async fn silent(&mut self, wait: Duration) {
        if let Ok(f) = tokio::time::timeout(wait, self.rx.next()).await {
            panic!(
                "expected nothing on the wire, got {:?}",
                f.map(|r| r.map(|f| f.code))
            );
        }
    }

    async fn send(&mut self, code: u32, payload: &'static [u8]) {
        let frame = ControlFrame {
            code,
            payload: Bytes::from_static(payload),
        };
        if self.tx.send(frame).await.is_err() {
            panic!("the actor's end is gone");
        }
    }
}

fn start(dialect: Dialect, keepalive: Option<Duration>) -> (Arc<Vm>, Agent) {
    let (vm, inbox) = testing::vm("actor-test", dialect, keepalive);
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (r, w) = tokio::io::split(ours);
    let reader = FramedRead::new(
        Box::pin(r) as crate::transport::BoxRead,
        ControlCodec::default(),
    );
    let writer = FramedWrite::new(
        Box::pin(w) as crate::transport::BoxWrite,
        ControlCodec::default(),
    );
    ControlActor::spawn(vm.clone(), inbox.calls, reader, writer, Vec::new());
    let (r, w) = tokio::io::split(theirs);
    let agent = Agent {
        rx: FramedRead::new(r, ControlCodec::default()),
        tx: FramedWrite::new(w, ControlCodec::default()),
    };
    (vm, agent)
}

/// Start `vm.call(code, payload)` in a task.
fn call(
    vm: &Arc<Vm>,
    code: u32,
    payload: &'static [u8],
    timeout: Duration,
) -> tokio::task::JoinHandle<Result<Bytes, ProxyError>> {
    let vm = vm.clone();
    tokio::spawn(async move {
        vm.call(code, "test", Bytes::from_static(payload), timeout)
            .await
    })
}

async fn result(
    h: tokio::task::JoinHandle<Result<Bytes, ProxyError>>,
) -> Result<Bytes, ProxyError> {
    match tokio::time::timeout(Duration::from_secs(5), h).await {
        Ok(Ok(r)) => r,
        _ => panic!("the call did not finish"),
    }
}

const LONG: Duration = Duration::from_secs(30);

/// Send a command the agent reads but does not answer before its 50 ms deadline: its client gets a timeout
/// and the slot is left abandoned.
async fn abandon_one(vm: &Arc<Vm>, agent: &mut Agent) {
    let a = call(vm, code::RESTARTCONTAINER, b"a", Duration::from_millis(50));
    agent.command().await;
    assert!(matches!(
        result(a).await,
        Err(ProxyError::CommandTimeout { .. })
    ));
}

#[tokio::test]
async fn commands_go_out_one_at_a_time_in_arrival_order() {
    let (vm, mut agent) = start(Dialect::CcAgent, None);
    let a = call(&vm, code::RESTARTCONTAINER, b"a", LONG);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b = call(&vm, code::RESTARTCONTAINER, b"b", LONG);
    tokio::time::sleep(Duration::from_millis(20)).await;
    let c = call(&vm, code::RESTARTCONTAINER, b"c", LONG);
    for (expected, reply, handle) in [(b"a", b"ra", a), (b"b", b"rb", b), (b"c", b"rc", c)] {
        let got = agent.command().await;
        assert_eq!(&got.payload[..], expected);
        // The next command waits for this reply.
        agent.silent(Duration::from_millis(50)).await;
        agent.send(code::ACK, reply).await;
        assert_eq!(&result(handle).await.unwrap_or_default()[..], reply);
    }
    assert_eq!(vm.commands.load(Ordering::Relaxed), 3);
}

#[tokio::test]
async fn an_error_reply_answers_only_its_command() {
    let (vm, mut agent) = start(Dialect::CcAgent, None);
    let a = call(&vm, code::RESTARTCONTAINER, b"a", LONG);
    agent.command().await;
    agent.send(code::ERROR, b"no such container\0").await;
    match result(a).await {
        Err(ProxyError::Agent { message, .. }) => assert_eq!(message, "no such container"),
        other => panic!("expected an agent error, got {other:?}"),
    }
    assert!(matches!(vm.state(), VmState::Ready));
}

#[tokio::test]
async fn a_queued_call_past_its_deadline_fails_without_being_sent() {
    let (vm, mut agent) = start(Dialect::CcAgent, None);
    let a = call(&vm, code::RESTARTCONTAINER, b"a", LONG);
    agent.command().await;
    let b = call(&vm, code::RESTARTCONTAINER, b"b", Duration::from_millis(50));
    assert!(matches!(
        result(b).await,
        Err(ProxyError::CommandTimeout { .. })
    ));
    agent.send(code::ACK, b"ra").await;
    assert_eq!(&result(a).await.unwrap_or_default()[..], b"ra");
    // b was never written.
    agent.silent(Duration::from_millis(50)).await;
}

#[tokio::test]
async fn an_abandoned_command_holds_the_channel_until_its_late_reply_which_is_discarded() {
    let (vm, mut agent) = start(Dialect::CcAgent, None);
    abandon_one(&vm, &mut agent).await;
    let b = call(&vm, code::RESTARTCONTAINER, b"b", LONG);
    // The slot is abandoned: b waits, so a's late reply cannot be taken for b's.
    agent.silent(Duration::from_millis(100)).await;
    agent.send(code::ACK, b"late reply to a").await;
    let got = agent.command().await;
    assert_eq!(&got.payload[..], b"b");
    agent.send(code::ACK, b"rb").await;
    assert_eq!(&result(b).await.unwrap_or_default()[..], b"rb");
    assert!(matches!(vm.state(), VmState::Ready));
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_command_never_answered_loses_the_vm() {
    let (vm, mut agent) = start(Dialect::CcAgent, None);
    abandon_one(&vm, &mut agent).await;
    let b = call(&vm, code::RESTARTCONTAINER, b"b", ABANDON_GRACE * 3);
    tokio::time::sleep(ABANDON_GRACE + Duration::from_secs(1)).await;
    assert!(matches!(vm.state(), VmState::Lost(LostReason::Hung { .. })));
    assert!(matches!(result(b).await, Err(ProxyError::Lost { .. })));
}

#[tokio::test]
async fn an_exit_event_between_a_command_and_its_reply_is_not_taken_for_the_reply() {
    let (vm, mut agent) = start(Dialect::Hyperstart, None);
    let stream = vm.allocate_stream(0).expect("within the token bounds");
    assert!(vm.bind_process(&stream, "c1", "p1", false, crate::stream::ProcessRole::Init));
    stream.mark_running();
    stream.stdout_eof();
    let n = stream.attach().unwrap_or(0);
    let a = call(&vm, code::RESTARTCONTAINER, b"a", LONG);
    agent.command().await;
    agent
        .send(
            Dialect::Hyperstart.process_async_event_code(),
            br#"{"container":"c1","process":"p1","event":"finished","status":7}"#,
        )
        .await;
    agent.send(code::NEXT, b"").await;
    agent.send(code::ACK, b"ra").await;
    assert_eq!(&result(a).await.unwrap_or_default()[..], b"ra");
    match stream.take(n) {
        crate::stream::Take::Last(frames) => {
            assert_eq!(frames.len(), 1);
            assert_eq!(frames[0].exit_status(), Some(7));
        }
        _ => panic!("the exit event did not end the stream"),
    }
}

#[tokio::test]
async fn a_reply_with_nothing_outstanding_loses_the_vm_and_fails_queued_calls() {
    let (vm, mut agent) = start(Dialect::CcAgent, None);
    agent.send(code::ACK, b"unsolicited").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(matches!(
        vm.state(),
        VmState::Lost(LostReason::UnsolicitedReply(code::ACK))
    ));
    let a = call(&vm, code::RESTARTCONTAINER, b"a", LONG);
    assert!(matches!(result(a).await, Err(ProxyError::Lost { .. })));
}

#[tokio::test]
async fn the_agent_closing_the_channel_fails_the_call_on_the_wire() {
    let (vm, mut agent) = start(Dialect::CcAgent, None);
    let a = call(&vm, code::RESTARTCONTAINER, b"a", LONG);
    agent.command().await;
    drop(agent);
    assert!(matches!(result(a).await, Err(ProxyError::Lost { .. })));
    assert!(matches!(
        vm.state(),
        VmState::Lost(LostReason::ControlClosed)
    ));
}

#[tokio::test]
async fn keepalive_pings_an_idle_agent_and_a_missed_answer_loses_the_vm() {
    let every = Duration::from_millis(100);
    let (vm, mut agent) = start(Dialect::CcAgent, Some(every));
    for _ in 0..2 {
        let ping = agent.command().await;
        assert_eq!(ping.code, code::PING);
        agent.send(code::ACK, b"").await;
    }
    assert!(matches!(vm.state(), VmState::Ready));
    // A command in between is not mistaken for the keepalive's answer, and its reply reaches its client.
    let a = call(&vm, code::RESTARTCONTAINER, b"a", LONG);
    let got = agent.command().await;
    let got = if got.code == code::PING {
        agent.send(code::ACK, b"").await;
        agent.command().await
    } else {
        got
    };
    assert_eq!(&got.payload[..], b"a");
    agent.send(code::ACK, b"ra").await;
    assert_eq!(&result(a).await.unwrap_or_default()[..], b"ra");
    // Now leave a PING unanswered.
    assert_eq!(agent.command().await.code, code::PING);
    tokio::time::sleep(every * 3).await;
    assert!(matches!(
        vm.state(),
        VmState::Lost(LostReason::KeepaliveMissed(_))
    ));
}

#[tokio::test]
async fn unregistering_fails_queued_and_in_flight_calls_as_unregistered() {
    let (vm, mut agent) = start(Dialect::CcAgent, None);
    let a = call(&vm, code::RESTARTCONTAINER, b"a", LONG);
    agent.command().await;
    let b = call(&vm, code::RESTARTCONTAINER, b"b", LONG);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(vm.transition(VmState::Unregistered));
    assert!(matches!(result(a).await, Err(ProxyError::Unregistered(_))));
    assert!(matches!(result(b).await, Err(ProxyError::Unregistered(_))));
}
