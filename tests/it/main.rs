//! Integration tests: each module starts the real `cc-proxy` binary and talks to it only through its socket,
//! ports and signals, with `cc-test-agent` as the VM's agent.

mod agent;
mod authz;
mod cli;
mod client;
mod common;
mod cshim;
mod demo;
mod foundation;
mod hostile;
mod legacy;
mod lifecycle;
mod limits;
mod mesh_balance;
mod mesh_cli;
mod mesh_control;
mod mesh_data;
mod mesh_identity;
mod mesh_more;
mod observability;
mod operations;
mod streams;
mod vm;
