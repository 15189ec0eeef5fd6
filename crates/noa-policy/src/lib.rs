//! The policy choke point of NOA ARK OS: every kernel and bus operation asks [`Policy::authorize`].
//!
//! Decisions come from Cedar (`cedar-policy`) over principals (users, agents, the node), actions and resources.
//! The default policy set (`default.cedar`) is embedded; `<data-dir>/policy.cedar` replaces it.
//! Facts that Cedar cannot compute from names alone (does the subject belong to the agent? does its spec
//! grant it?) are passed as request context, so a decision needs no entity store and stays in microseconds.

mod error;

pub use error::{Error, Result};

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision, EntityId, EntityTypeName, EntityUid,
    PolicySet, PrincipalConstraint, Request, RestrictedExpression,
};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// The embedded default policy set.
pub const DEFAULT_POLICY: &str = include_str!("default.cedar");

/// Who asks.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    /// An API caller; the admin token authenticates `User("admin")`.
    User(String),
    /// A process, by name.
    Agent(String),
    /// The kernel acting for itself.
    Node,
}

impl Principal {
    /// A short stable id for records: `user:<name>`, `agent:<name>`, `node`.
    pub fn id(&self) -> String {
        match self {
            Principal::User(n) => format!("user:{n}"),
            Principal::Agent(n) => format!("agent:{n}"),
            Principal::Node => "node".into(),
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::User(n) => write!(f, "user {n:?}"),
            Principal::Agent(n) => write!(f, "agent {n:?}"),
            Principal::Node => f.write_str("the node"),
        }
    }
}

/// What is asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Spawn,
    Stop,
    Kill,
    Restart,
    Read,
    Publish,
    Subscribe,
    Request,
    /// Answering a request that was delivered to the principal (publishing to its reply subject).
    Reply,
    /// Reading a file or listing a folder of the VFS.
    ReadFile,
    /// Writing, deleting or rolling back a file of the VFS.
    WriteFile,
    /// Mounting or unmounting a host folder.
    Mount,
    /// Reading a secret's value (at spawn, to inject it).
    ReadSecret,
    /// Setting or deleting a secret.
    WriteSecret,
    /// Taking a backup of the whole store.
    Backup,
    /// Reading or verifying the audit log.
    ReadAudit,
    /// Starting, cancelling, pausing, resuming or retrying a run of a workflow, or registering it for its triggers.
    RunWorkflow,
    /// Approving a workflow's approval step.
    Approve,
}

/// Every action, in a fixed order.
pub const ACTIONS: [Action; 18] = [
    Action::Spawn,
    Action::Stop,
    Action::Kill,
    Action::Restart,
    Action::Read,
    Action::Publish,
    Action::Subscribe,
    Action::Request,
    Action::Reply,
    Action::ReadFile,
    Action::WriteFile,
    Action::Mount,
    Action::ReadSecret,
    Action::WriteSecret,
    Action::Backup,
    Action::ReadAudit,
    Action::RunWorkflow,
    Action::Approve,
];

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Spawn => "spawn",
            Action::Stop => "stop",
            Action::Kill => "kill",
            Action::Restart => "restart",
            Action::Read => "read",
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::Request => "request",
            Action::Reply => "reply",
            Action::ReadFile => "read_file",
            Action::WriteFile => "write_file",
            Action::Mount => "mount",
            Action::ReadSecret => "read_secret",
            Action::WriteSecret => "write_secret",
            Action::Backup => "backup",
            Action::ReadAudit => "read_audit",
            Action::RunWorkflow => "run_workflow",
            Action::Approve => "approve",
        }
    }
}

/// What it is asked about.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Resource {
    Process(String),
    /// A subject, or for `subscribe` a pattern.
    Subject(String),
    /// The system as a whole (status, events, backups, the audit log).
    System,
    /// A VFS path.
    File(String),
    /// A secret, by name.
    Secret(String),
    /// A workflow, by name.
    Workflow(String),
}

impl Resource {
    /// A short stable id for records: the process name, subject, path or secret name, or `system`.
    pub fn id(&self) -> &str {
        match self {
            Resource::Process(n)
            | Resource::Subject(n)
            | Resource::File(n)
            | Resource::Secret(n)
            | Resource::Workflow(n) => n,
            Resource::System => "system",
        }
    }
}

impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Resource::Process(n) => write!(f, "process {n:?}"),
            Resource::Subject(s) => write!(f, "subject {s:?}"),
            Resource::System => f.write_str("the system"),
            Resource::File(p) => write!(f, "file {p:?}"),
            Resource::Secret(n) => write!(f, "secret {n:?}"),
            Resource::Workflow(n) => write!(f, "workflow {n:?}"),
        }
    }
}

/// The policy engine: a parsed policy set and a Cedar authorizer.
pub struct Policy {
    set: PolicySet,
    /// For each kind of principal (user, agent, node) and each action, the policies whose scope can match
    /// such a request; Cedar then evaluates only those. Index: `kind * ACTIONS.len() + action`.
    slices: Vec<PolicySet>,
    authorizer: Authorizer,
    source: String,
    /// Entity type names, parsed once: parsing them per decision would cost more than the decision.
    types: Types,
    /// Remembered decisions (at most `DECISION_CACHE`, then forgotten all at once).
    cache: std::sync::Mutex<std::collections::HashMap<DecisionKey, Result<()>>>,
}

impl fmt::Debug for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Policy")
            .field("source", &self.source)
            .finish()
    }
}

struct Types {
    user: EntityTypeName,
    agent: EntityTypeName,
    node: EntityUid,
    process: EntityTypeName,
    subject: EntityTypeName,
    file: EntityTypeName,
    secret: EntityTypeName,
    workflow: EntityTypeName,
    system: EntityUid,
    actions: Vec<(Action, EntityUid)>,
    /// Every combination of the context facts, built once (bit i of the index is fact i of `FACTS`).
    contexts: Vec<Context>,
}

/// What a decision depends on, for a fixed policy set.
type DecisionKey = (Principal, Action, Resource, bool);

/// Most decisions remembered.
const DECISION_CACHE: usize = 16_384;

/// The context facts, in the order of the bits of a context index.
const FACTS: [&str; 7] = [
    "own_subject",
    "agent_inbox",
    "reply_inbox",
    "system",
    "granted",
    "own_files",
    "shared_files",
];

impl Types {
    fn new() -> Types {
        let ty = |t: &str| {
            EntityTypeName::from_str(t).unwrap_or_else(|e| panic!("built-in entity type {t}: {e}"))
        };
        let all = ACTIONS;
        Types {
            user: ty("Noa::User"),
            agent: ty("Noa::Agent"),
            node: uid("Noa::Node", "local"),
            process: ty("Noa::Process"),
            subject: ty("Noa::Subject"),
            file: ty("Noa::File"),
            secret: ty("Noa::Secret"),
            workflow: ty("Noa::Workflow"),
            system: uid("Noa::System", "noa"),
            actions: all
                .iter()
                .map(|a| (*a, uid("Noa::Action", a.as_str())))
                .collect(),
            contexts: (0..1usize << FACTS.len())
                .map(|index| {
                    let pairs = FACTS.iter().enumerate().map(|(i, name)| {
                        (
                            name.to_string(),
                            RestrictedExpression::new_bool(index & (1 << i) != 0),
                        )
                    });
                    Context::from_pairs(pairs).unwrap_or_else(|e| panic!("built-in context: {e}"))
                })
                .collect(),
        }
    }

    fn action(&self, a: Action) -> EntityUid {
        self.actions
            .iter()
            .find(|(x, _)| *x == a)
            .map(|(_, u)| u.clone())
            .unwrap_or_else(|| uid("Noa::Action", a.as_str()))
    }
}

fn uid(ty: &str, id: &str) -> EntityUid {
    // The type names are fixed and valid, so parsing cannot fail.
    let ty =
        EntityTypeName::from_str(ty).unwrap_or_else(|e| panic!("built-in entity type {ty}: {e}"));
    EntityUid::from_type_name_and_id(ty, EntityId::new(id))
}

impl Policy {
    /// The embedded default policy set.
    pub fn default_policy() -> Policy {
        Policy::parse(DEFAULT_POLICY, "<embedded default.cedar>")
            .unwrap_or_else(|e| panic!("the embedded policy is invalid: {e}"))
    }

    /// Parses a policy set; errors name `file`, line and column.
    pub fn parse(text: &str, file: &str) -> Result<Policy> {
        let set = PolicySet::from_str(text).map_err(|errs| {
            use miette::Diagnostic;
            let offset = errs
                .labels()
                .and_then(|mut l| l.next())
                .map(|l| l.offset())
                .unwrap_or(0);
            let (line, column) = line_col(text, offset);
            let message = errs
                .iter()
                .map(|e| e.to_string())
                .collect::<Vec<_>>()
                .join("; ");
            Error::Parse {
                file: file.to_owned(),
                line,
                column,
                message,
            }
        })?;
        let types = Types::new();
        let slices = slice(&set, &types);
        Ok(Policy {
            set,
            slices,
            authorizer: Authorizer::new(),
            types,
            cache: Default::default(),
            source: file.to_owned(),
        })
    }

    /// `<data_dir>/policy.cedar` if it exists, else the embedded default.
    pub fn load(data_dir: &Path) -> Result<Policy> {
        let path = data_dir.join("policy.cedar");
        match std::fs::read_to_string(&path) {
            Ok(text) => Policy::parse(&text, &path.display().to_string()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Policy::default_policy()),
            Err(e) => Err(Error::Io {
                file: path.display().to_string(),
                message: e.to_string(),
            }),
        }
    }

    /// Where the policy set came from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// Decides. `granted` says whether the principal's own grants cover the resource (the kernel checks those).
    pub fn authorize(
        &self,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        granted: bool,
    ) -> Result<()> {
        // Decisions are pure functions of these four for a fixed policy set, so they can be remembered.
        let key = (principal.clone(), action, resource.clone(), granted);
        if let Some(hit) = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return hit.clone();
        }
        let decision = self.decide(principal, action, resource, granted);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= DECISION_CACHE {
            cache.clear();
        }
        cache.insert(key, decision.clone());
        decision
    }

    /// Asks Cedar, without the decision cache.
    pub fn decide(
        &self,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        granted: bool,
    ) -> Result<()> {
        let kind = match principal {
            Principal::User(_) => 0,
            Principal::Agent(_) => 1,
            Principal::Node => 2,
        };
        let set = ACTIONS
            .iter()
            .position(|x| *x == action)
            .and_then(|i| self.slices.get(kind * ACTIONS.len() + i))
            .unwrap_or(&self.set);
        self.decide_in(set, principal, action, resource, granted)
    }

    /// Asks Cedar with the policies of `set`.
    fn decide_in(
        &self,
        set: &PolicySet,
        principal: &Principal,
        action: Action,
        resource: &Resource,
        granted: bool,
    ) -> Result<()> {
        let p = match principal {
            Principal::User(n) => {
                EntityUid::from_type_name_and_id(self.types.user.clone(), EntityId::new(n))
            }
            Principal::Agent(n) => {
                EntityUid::from_type_name_and_id(self.types.agent.clone(), EntityId::new(n))
            }
            Principal::Node => self.types.node.clone(),
        };
        let a = self.types.action(action);
        let (r, subject) = match resource {
            Resource::Process(n) => (
                EntityUid::from_type_name_and_id(self.types.process.clone(), EntityId::new(n)),
                None,
            ),
            Resource::Subject(s) => (
                EntityUid::from_type_name_and_id(self.types.subject.clone(), EntityId::new(s)),
                Some(s.as_str()),
            ),
            Resource::System => (self.types.system.clone(), None),
            Resource::File(p) => (
                EntityUid::from_type_name_and_id(self.types.file.clone(), EntityId::new(p)),
                None,
            ),
            Resource::Secret(n) => (
                EntityUid::from_type_name_and_id(self.types.secret.clone(), EntityId::new(n)),
                None,
            ),
            Resource::Workflow(n) => (
                EntityUid::from_type_name_and_id(self.types.workflow.clone(), EntityId::new(n)),
                None,
            ),
        };
        let (own_files, shared_files) = match resource {
            Resource::File(p) => (
                matches!(principal, Principal::Agent(name)
                    if p.strip_prefix("/agents/")
                        .and_then(|rest| rest.strip_prefix(name.as_str()))
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))),
                p == "/shared" || p.starts_with("/shared/"),
            ),
            _ => (false, false),
        };
        let own_subject = match (principal, subject) {
            (Principal::Agent(name), Some(s)) => s
                .strip_prefix("agent.")
                .and_then(|rest| rest.strip_prefix(name.as_str()))
                .is_some_and(|rest| rest.starts_with('.')),
            _ => false,
        };
        let subject = subject.unwrap_or("");
        let agent_inbox = {
            let t: Vec<&str> = subject.split('.').collect();
            t.len() == 3 && t[0] == "agent" && t[2] == "inbox" && t[1] != "*" && t[1] != ">"
        };
        let facts = [
            own_subject,
            agent_inbox,
            subject.starts_with("_INBOX."),
            subject.starts_with("sys."),
            granted,
            own_files,
            shared_files,
        ];
        let index = facts
            .iter()
            .enumerate()
            .fold(0usize, |acc, (i, f)| acc | (usize::from(*f) << i));
        let context = self.types.contexts[index].clone();
        let request =
            Request::new(p, a, r, context, None).map_err(|e| Error::Request(e.to_string()))?;
        let response =
            self.authorizer
                .is_authorized(&request, set, &cedar_policy::Entities::empty());
        if response.decision() == Decision::Allow {
            return Ok(());
        }
        let forbids: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| {
                self.set
                    .policy(id)
                    .and_then(|p| p.annotation("id").map(str::to_owned))
                    .unwrap_or_else(|| id.to_string())
            })
            .collect();
        let reason = if forbids.is_empty() {
            format!("no policy in {} permits it", self.source)
        } else {
            format!("forbidden by policy {}", forbids.join(", "))
        };
        Err(Error::Denied {
            principal: principal.to_string(),
            action: action.as_str().to_owned(),
            resource: resource.to_string(),
            reason,
        })
    }
}

/// Splits a policy set by the kind of principal and the action its scope can match, so that a decision
/// evaluates only the policies that could apply (Cedar otherwise evaluates every policy's scope and
/// conditions). Entities are always empty here, so `principal in X` and `principal == X` can only match a
/// principal of X's type, and `action in [..]` only the actions listed. A policy set with templates is not
/// split: every slice is the whole set.
fn slice(set: &PolicySet, types: &Types) -> Vec<PolicySet> {
    let kinds: [&EntityTypeName; 3] = [&types.user, &types.agent, types.node.type_name()];
    let static_only = set.templates().next().is_none() && set.policies().all(|p| p.is_static());
    let mut out = Vec::with_capacity(kinds.len() * ACTIONS.len());
    for kind in kinds {
        for (_, action) in &types.actions {
            if !static_only {
                out.push(set.clone());
                continue;
            }
            let mut slice = PolicySet::new();
            for policy in set.policies() {
                let principal_ok = match policy.principal_constraint() {
                    PrincipalConstraint::Any => true,
                    PrincipalConstraint::Eq(u) | PrincipalConstraint::In(u) => {
                        u.type_name() == kind
                    }
                    PrincipalConstraint::Is(t) | PrincipalConstraint::IsIn(t, _) => &t == kind,
                };
                let action_ok = match policy.action_constraint() {
                    ActionConstraint::Any => true,
                    ActionConstraint::Eq(a) => &a == action,
                    ActionConstraint::In(list) => list.contains(action),
                };
                if principal_ok && action_ok && slice.add(policy.clone()).is_err() {
                    // Cannot happen for a static policy taken from a valid set; evaluate everything then.
                    slice = set.clone();
                    break;
                }
            }
            out.push(slice);
        }
    }
    out
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
