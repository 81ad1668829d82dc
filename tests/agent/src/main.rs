//! `cc-test-agent`: a test peer for cc-proxy that plays the agent inside one or many VMs.
//!
//! It speaks the hyperstart-family agent protocol (either dialect) on real transports, runs the
//! processes it is asked to start for real (no isolation), streams their stdio over the I/O
//! channel, reports their exit, and can inject faults. On the host it listens on unix sockets
//! standing in for VMM sockets, serving up to thousands of VMs from one process; in a guest it
//! listens on vsock or virtio-serial. See README.md for flags and rules.

mod cli;
mod commands;
mod process;
mod pty;
mod transport;
mod vm;

use std::io::Write;
use std::sync::Arc;

use clap::Parser;

use crate::cli::{AgentConfig, Args};
use crate::transport::TransportError;
use crate::vm::{Channel, Vm};

fn main() {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("cc-test-agent: {e}");
        std::process::exit(2);
    }
    raise_fd_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cc-test-agent: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(async {
        setup(&args)?;
        println!("cc-test-agent: listening");
        let _ = std::io::stdout().flush();
        std::future::pending::<()>().await;
        Ok::<(), TransportError>(())
    });
    if let Err(e) = result {
        eprintln!("cc-test-agent: {e}");
        std::process::exit(1);
    }
}

/// Creates the VMs and binds every socket before returning.
fn setup(args: &Args) -> Result<(), TransportError> {
    let config = Arc::new(AgentConfig::from(args));
    let count = args.count as usize;
    if (args.vsock || args.virtio_serial) && count != 1 {
        return Err(TransportError::GuestCount(count));
    }
    let vms: Vec<Arc<Vm>> = (0..args.count)
        .map(|i| Vm::new(i, Arc::clone(&config)))
        .collect();
    if let Some(path) = &args.hvsock {
        for (i, vm) in vms.iter().enumerate() {
            let listener = transport::bind_unix(&transport::suffixed(path, i, count))?;
            tokio::spawn(transport::serve_hvsock(listener, Arc::clone(vm)));
        }
    } else if let (Some(control), Some(io)) = (&args.control, &args.io) {
        for (i, vm) in vms.iter().enumerate() {
            let control = transport::bind_unix(&transport::suffixed(control, i, count))?;
            let io = transport::bind_unix(&transport::suffixed(io, i, count))?;
            tokio::spawn(transport::serve_channel(
                control,
                Arc::clone(vm),
                Channel::Control,
            ));
            tokio::spawn(transport::serve_channel(io, Arc::clone(vm), Channel::Io));
        }
    } else if args.vsock {
        transport::serve_vsock(
            transport::CONTROL_PORT,
            Arc::clone(&vms[0]),
            Channel::Control,
        )?;
        transport::serve_vsock(transport::IO_PORT, Arc::clone(&vms[0]), Channel::Io)?;
    } else if args.virtio_serial {
        let control = transport::find_serial_port(transport::CONTROL_PORT_NAME)?;
        let io = transport::find_serial_port(transport::IO_PORT_NAME)?;
        let handle = tokio::runtime::Handle::current();
        transport::serve_serial(
            handle.clone(),
            control,
            Arc::clone(&vms[0]),
            Channel::Control,
        );
        transport::serve_serial(handle, io, Arc::clone(&vms[0]), Channel::Io);
    }
    Ok(())
}

/// Serving a thousand VMs takes a few thousand descriptors: lift the soft limit to the hard one.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit through a valid pointer to a local.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
