//! Client authorization: which VMs a client may use, and who may call the privileged methods.
//!
//! Roles:
//! - every VM has an *owner*: the uid of the client that registered it (JSON-RPC or legacy), kept in the VM's
//!   state record so it survives a restart (records from before owners were kept belong to root);
//! - a client is *privileged* when its uid is 0 or the daemon's own uid (which could take over the daemon
//!   anyway), or it belongs to the `--admin-group` (its primary group, a supplementary group of the
//!   connecting process, or a member listed for the group);
//! - everyone else is an *owner-only* client: it may use the VMs it registered, and nothing else.
//!
//! Events: a connection is classified once, when it is accepted ([`classify`]), from `SO_PEERCRED` and the
//! process's `/proc/PID/status`. Every request that names a VM, or a token of one, asks [`check_vm`] before it
//! touches the VM; a refusal is the error `1018 PERMISSION_DENIED` (a legacy error response, an HTTP 403 for a
//! stream attach), counted in `cc_proxy_permission_denied_total{protocol}` and logged at warning with the
//! client's pid, uid and gid. Lists (`vm.list`, `proxy.health`'s counts) and subscriptions (`events.subscribe`,
//! `tap.observe`) show an owner-only client only its own VMs ([`Access::sees`]).

use crate::admin::metrics::{ProtocolLabel, METRICS};
use crate::error::ProxyError;
use crate::server::Peer;

/// How much a client connection may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// uid 0 or a member of the admin group: every VM, every privileged method.
    Privileged,
    /// Only the VMs this uid registered.
    OwnerOnly,
}

/// The group named by `--admin-group`, resolved at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminGroup {
    pub name: String,
    pub gid: u32,
    /// The user names listed as members in the group database at startup.
    pub members: Vec<String>,
}

/// Why the admin group cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthzError {
    #[error("unknown group {0:?} (see --admin-group)")]
    UnknownGroup(String),
    #[error("cannot look up group {name:?}: {source}")]
    Lookup { name: String, source: nix::Error },
}

impl AdminGroup {
    /// Resolve a group name (or numeric gid) and its member list.
    pub fn resolve(name: &str) -> Result<AdminGroup, AuthzError> {
        let lookup = |r: nix::Result<Option<nix::unistd::Group>>| {
            r.map_err(|source| AuthzError::Lookup {
                name: name.to_string(),
                source,
            })
        };
        let group = match name.parse::<u32>() {
            Ok(gid) => lookup(nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(
                gid,
            )))?
            .map(|g| (g.gid.as_raw(), g.mem))
            // A numeric gid with no entry still names a group processes can be in.
            .or(Some((gid, Vec::new()))),
            Err(_) => lookup(nix::unistd::Group::from_name(name))?.map(|g| (g.gid.as_raw(), g.mem)),
        };
        let (gid, members) = group.ok_or_else(|| AuthzError::UnknownGroup(name.to_string()))?;
        Ok(AdminGroup {
            name: name.to_string(),
            gid,
            members,
        })
    }
}

/// uid 0 and the daemon's own effective uid are privileged whatever their groups.
pub fn always_privileged(uid: u32) -> bool {
    uid == 0 || uid == nix::unistd::geteuid().as_raw()
}

/// Classify a client: privileged when uid 0 or the daemon's own effective uid, or when `admin` is set and the client's primary gid, one of its
/// process's supplementary `groups`, or its user name (looked up by uid) is in the group.
pub fn classify(uid: u32, gid: u32, groups: &[u32], admin: Option<&AdminGroup>) -> Access {
    if always_privileged(uid) {
        return Access::Privileged;
    }
    let Some(admin) = admin else {
        return Access::OwnerOnly;
    };
    if gid == admin.gid || groups.contains(&admin.gid) {
        return Access::Privileged;
    }
    let listed = !admin.members.is_empty()
        && nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
            .ok()
            .flatten()
            .is_some_and(|u| admin.members.contains(&u.name));
    if listed {
        Access::Privileged
    } else {
        Access::OwnerOnly
    }
}

impl Access {
    /// Whether a client with this access and `uid` may see and use a VM owned by `owner`.
    pub fn sees(self, uid: u32, owner: u32) -> bool {
        self == Access::Privileged || uid == owner
    }
}

/// Which front end refused a request (the `protocol` label of the refusal counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Front {
    JsonRpc,
    Attach,
    Legacy,
}

impl Front {
    fn as_str(self) -> &'static str {
        match self {
            Front::JsonRpc => "jsonrpc",
            Front::Attach => "stream",
            Front::Legacy => "legacy",
        }
    }
}

/// May `peer` use VM `vm`, owned by `owner`? A refusal is counted and logged.
pub fn check_vm(peer: &Peer, vm: &str, owner: u32, front: Front) -> Result<(), ProxyError> {
    if peer.access.sees(peer.uid, owner) {
        return Ok(());
    }
    refused(peer, Some(vm), None, front)
}

/// Is `peer` privileged? `what` names the method for the log line; a refusal is counted and logged.
pub fn check_privileged(peer: &Peer, what: &str, front: Front) -> Result<(), ProxyError> {
    if peer.access == Access::Privileged {
        return Ok(());
    }
    refused(peer, None, Some(what), front)
}

fn refused(
    peer: &Peer,
    vm: Option<&str>,
    method: Option<&str>,
    front: Front,
) -> Result<(), ProxyError> {
    METRICS
        .permission_denied
        .get_or_create(&ProtocolLabel {
            protocol: front.as_str().into(),
        })
        .inc();
    tracing::warn!(
        vm,
        method,
        peer_pid = peer.pid,
        peer_uid = peer.uid,
        peer_gid = peer.gid,
        protocol = front.as_str(),
        "permission denied"
    );
    Err(ProxyError::PermissionDenied {
        vm: vm.map(str::to_string),
        uid: peer.uid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin(gid: u32, members: &[&str]) -> AdminGroup {
        AdminGroup {
            name: "ccadmin".into(),
            gid,
            members: members.iter().map(|m| m.to_string()).collect(),
        }
    }

    #[test]
    fn root_and_admin_group_members_are_privileged() {
        assert_eq!(classify(0, 0, &[], None), Access::Privileged);
        // 54321: a uid that is neither root nor the uid running the tests.
        assert_eq!(classify(54321, 54321, &[], None), Access::OwnerOnly);
        let a = admin(4242, &[]);
        assert_eq!(classify(54321, 4242, &[], Some(&a)), Access::Privileged);
        assert_eq!(
            classify(54321, 100, &[7, 4242], Some(&a)),
            Access::Privileged
        );
        assert_eq!(classify(54321, 100, &[7], Some(&a)), Access::OwnerOnly);
        // A member listed by name: root's entry is the one every system has.
        let listed = admin(4242, &["root"]);
        assert_eq!(classify(0, 0, &[], Some(&listed)), Access::Privileged);
    }

    #[test]
    fn owner_only_clients_see_their_own_vms() {
        assert!(Access::OwnerOnly.sees(1000, 1000));
        assert!(!Access::OwnerOnly.sees(1000, 0));
        assert!(Access::Privileged.sees(1000, 1));
    }

    #[test]
    fn groups_resolve_by_name_and_number() {
        assert_eq!(AdminGroup::resolve("root").map(|g| g.gid).ok(), Some(0));
        assert_eq!(AdminGroup::resolve("4242").map(|g| g.gid).ok(), Some(4242));
        assert!(matches!(
            AdminGroup::resolve("no-such-group-here"),
            Err(AuthzError::UnknownGroup(_))
        ));
    }
}
