//! The `cc-proxy` client subcommands as an operator types them: the socket from the environment, `exec`
//! without `--` and with `-e -w -u`, docker-like exit statuses, and errors that name what the user got wrong.

use std::process::{Command, Stdio};

use crate::common::{proxy_bin, Env};

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Run the client with `CC_PROXY_SOCKET` and no `--socket`.
fn cli_env(env: &Env, args: &[&str]) -> std::process::Output {
    Command::new(proxy_bin())
        .env("CC_PROXY_SOCKET", &env.socket)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("cc-proxy client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_as_an_operator_types_it() {
    let mut env = Env::start().await;
    let agent = env.agent(&[]);
    env.register("vm1", &agent, None).await;

    // The socket from the environment; the command without `--`, its own options passed through.
    let out = cli_env(&env, &["exec", "vm1", "echo", "-n", "hi"]);
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "hi".into()),
        "{out:?}"
    );
    let out = cli_env(&env, &["exec", "vm1", "--", "sh", "-c", "exit 5"]);
    assert_eq!(out.status.code(), Some(5), "{out:?}");

    // -e, -w, -u reach the process.
    let out = cli_env(
        &env,
        &[
            "exec",
            "-e",
            "GREETING=hello there",
            "-w",
            "/tmp",
            "-u",
            "65534",
            "vm1",
            "sh",
            "-c",
            "echo \"$GREETING\"; pwd; id -u",
        ],
    );
    assert_eq!(
        (out.status.code(), text(&out.stdout)),
        (Some(0), "hello there\n/tmp\n65534\n".into()),
        "{out:?}"
    );
    let out = cli_env(&env, &["exec", "-e", "=x", "vm1", "true"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("no name"), "{out:?}");

    // Docker's statuses when the command cannot be run: 127 not found, 126 cannot be invoked. A cc-agent
    // says why; hyperstart's ERROR carries no text, so any refusal there is 126.
    let cc = env.agent(&["--dialect", "cc-agent"]);
    env.register("cc", &cc, None).await;
    let out = cli_env(&env, &["exec", "cc", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    assert!(text(&out.stderr).contains("/no/such/program"), "{out:?}");
    for vm in ["cc", "vm1"] {
        let out = cli_env(&env, &["exec", vm, "/etc/passwd"]);
        assert_eq!(out.status.code(), Some(126), "{vm}: {out:?}");
        let out = cli_env(&env, &["exec", "-u", "no-such-user", vm, "true"]);
        assert_eq!(out.status.code(), Some(126), "{vm}: {out:?}");
    }
    let out = cli_env(&env, &["exec", "vm1", "/no/such/program"]);
    assert_eq!(out.status.code(), Some(126), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_errors_name_what_is_wrong() {
    let env = Env::start().await;
    // A user's bad JSON is the user's, not the daemon's, and nothing is sent.
    let out = env.cli(&["call", "vm.info", "{id:vm1}"], b"");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = text(&out.stderr);
    assert!(err.contains("PARAMS argument is not JSON"), "{err}");
    assert!(!err.contains("unexpected response"), "{err}");
    // A missing argument is named.
    let out = env.cli(&["call"], b"");
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(text(&out.stderr).contains("<METHOD>"), "{out:?}");
    // help --help is help, not an error; help names a subcommand's arguments with their meaning.
    let out = env.cli(&["help", "--help"], b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let out = env.cli(&["help", "vm", "register"], b"");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let help = text(&out.stdout);
    for said in [
        "--control <URI>",
        "control channel",
        "--io <URI>",
        "I/O channel",
        "<ID>",
        "128 characters",
    ] {
        assert!(help.contains(said), "{said:?} missing in\n{help}");
    }
    // Tapping a VM that does not exist says so at once instead of waiting for events.
    let t0 = std::time::Instant::now();
    let out = env.cli(&["tap", "ghost"], b"");
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    assert!(text(&out.stderr).contains("ghost"), "{out:?}");
    assert!(t0.elapsed() < std::time::Duration::from_secs(5));
}
