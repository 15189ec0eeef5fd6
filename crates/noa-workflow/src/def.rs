//! The workflow file: its types, and the parser and validator that turn YAML into them.
//!
//! Every problem found is a [`Diagnostic`] with file, line, column and, where one helps, a hint;
//! validation collects all of them rather than stopping at the first.

use crate::expr::{ExprError, Template};
use crate::yaml::{self, Kind, Node, Pos};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// One problem in a workflow file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: String,
    pub pos: Pos,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.file, self.pos, self.message)?;
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

/// The type of a workflow input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputType {
    String,
    Number,
    Integer,
    Boolean,
    Array,
    Object,
}

impl InputType {
    const ALL: [(&'static str, InputType); 6] = [
        ("string", InputType::String),
        ("number", InputType::Number),
        ("integer", InputType::Integer),
        ("boolean", InputType::Boolean),
        ("array", InputType::Array),
        ("object", InputType::Object),
    ];

    pub fn name(self) -> &'static str {
        InputType::ALL
            .iter()
            .find(|(_, t)| *t == self)
            .map(|(n, _)| *n)
            .unwrap_or("string")
    }

    /// Whether `v` has this type.
    pub fn accepts(self, v: &Value) -> bool {
        match self {
            InputType::String => v.is_string(),
            InputType::Number => v.is_number(),
            InputType::Integer => v.is_i64() || v.is_u64(),
            InputType::Boolean => v.is_boolean(),
            InputType::Array => v.is_array(),
            InputType::Object => v.is_object(),
        }
    }

    /// Reads a value given as text on a command line: strings as they are, the rest as JSON.
    pub fn coerce(self, text: &str) -> Result<Value, String> {
        if self == InputType::String {
            return Ok(Value::String(text.to_owned()));
        }
        let v: Value = serde_json::from_str(text.trim())
            .map_err(|_| format!("{text:?} is not {}", article(self.name())))?;
        if self.accepts(&v) {
            Ok(v)
        } else {
            Err(format!("{text:?} is not {}", article(self.name())))
        }
    }
}

fn article(t: &str) -> String {
    match t {
        "integer" | "array" | "object" => format!("an {t}"),
        _ => format!("a {t}"),
    }
}

#[derive(Clone, Debug)]
pub struct InputDef {
    pub name: String,
    pub ty: InputType,
    pub default: Option<Value>,
    pub description: Option<String>,
}

/// A JSON value whose strings are templates.
#[derive(Clone, Debug)]
pub enum ValueTemplate {
    Str(Template),
    Array(Vec<ValueTemplate>),
    Object(Vec<(String, ValueTemplate)>),
    Other(Value),
}

impl ValueTemplate {
    pub fn render(&self, scope: &crate::expr::Scope) -> Result<Value, String> {
        Ok(match self {
            ValueTemplate::Str(t) => t.value(scope)?,
            ValueTemplate::Array(a) => Value::Array(
                a.iter()
                    .map(|v| v.render(scope))
                    .collect::<Result<_, _>>()?,
            ),
            ValueTemplate::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, v)| Ok((k.clone(), v.render(scope)?)))
                    .collect::<Result<_, String>>()?,
            ),
            ValueTemplate::Other(v) => v.clone(),
        })
    }

    fn templates<'a>(&'a self, out: &mut Vec<&'a Template>) {
        match self {
            ValueTemplate::Str(t) => out.push(t),
            ValueTemplate::Array(a) => a.iter().for_each(|v| v.templates(out)),
            ValueTemplate::Object(o) => o.iter().for_each(|(_, v)| v.templates(out)),
            ValueTemplate::Other(_) => {}
        }
    }
}

/// What a step does.
#[derive(Clone, Debug)]
pub enum StepKind {
    /// A shell command (`sh -c`), run as a supervised child process; its stdout is the output.
    Run { command: Template },
    /// A completion from a local model, through `ai.infer` on the bus.
    Llm {
        model: Option<Template>,
        prompt: Template,
        system: Option<Template>,
        max_tokens: Option<u64>,
        temperature: Option<f64>,
        seed: Option<u64>,
    },
    /// An HTTP request; the response body is the output; a status of 400 or more fails the step.
    Http {
        method: String,
        url: Template,
        headers: Vec<(String, Template)>,
        body: Option<ValueTemplate>,
    },
    /// Waits for a duration; the timer survives restarts.
    Sleep { duration: Duration },
    /// Waits for a message on a bus subject; its payload is the output.
    WaitFor {
        subject: Template,
        timeout: Option<Duration>,
    },
    /// Waits for a person to approve (`noa workflow approve`); the approver is the output.
    Approval { message: Option<Template> },
    /// Runs another workflow file as a child run; its outputs (JSON) are the output.
    Workflow {
        file: String,
        def: Arc<Workflow>,
        inputs: Vec<(String, ValueTemplate)>,
    },
    /// Publishes to a bus subject.
    Publish {
        subject: Template,
        payload: ValueTemplate,
    },
}

impl StepKind {
    pub fn name(&self) -> &'static str {
        match self {
            StepKind::Run { .. } => "run",
            StepKind::Llm { .. } => "llm",
            StepKind::Http { .. } => "http",
            StepKind::Sleep { .. } => "sleep",
            StepKind::WaitFor { .. } => "wait_for",
            StepKind::Approval { .. } => "approval",
            StepKind::Workflow { .. } => "workflow",
            StepKind::Publish { .. } => "publish",
        }
    }
}

/// The step kinds this version runs, and those reserved for later versions.
pub const STEP_KINDS: &[&str] = &[
    "run", "llm", "http", "sleep", "wait_for", "approval", "workflow", "publish",
];
const RESERVED_KINDS: &[&str] = &["agent", "tool"];

#[derive(Clone, Debug)]
pub struct Retry {
    /// Attempts in all, the first included (at least 1).
    pub attempts: u32,
    pub backoff: Duration,
    pub factor: f64,
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            attempts: 1,
            backoff: Duration::from_millis(200),
            factor: 2.0,
            max_backoff: Duration::from_secs(60),
        }
    }
}

impl Retry {
    /// The wait before attempt `next` (2 for the first retry).
    pub fn delay(&self, next: u32) -> Duration {
        let exp = self.factor.powi(next.saturating_sub(2) as i32);
        self.backoff.mul_f64(exp.min(1e6)).min(self.max_backoff)
    }
}

#[derive(Clone, Debug)]
pub enum ForEach {
    List(Vec<Value>),
    Expr(Template),
}

#[derive(Clone, Debug)]
pub struct LoopSpec {
    pub until: Template,
    pub max_iterations: u32,
}

#[derive(Clone, Debug)]
pub struct Step {
    pub id: String,
    pub pos: Pos,
    pub name: Option<String>,
    pub needs: Vec<String>,
    pub kind: StepKind,
    pub condition: Option<Template>,
    pub for_each: Option<ForEach>,
    pub max_parallel: Option<usize>,
    pub loop_spec: Option<LoopSpec>,
    pub retry: Retry,
    pub timeout: Option<Duration>,
    pub continue_on_error: bool,
    pub env: Vec<(String, Template)>,
    pub outputs: Vec<(String, Template)>,
    /// Where each of the step's keys is written, for messages.
    pub key_pos: Vec<(String, Pos)>,
}

impl Step {
    /// Where key `field` (or the part of `field` before its first `.`) is written.
    pub fn pos_of(&self, field: &str) -> Pos {
        let key = field.split('.').next().unwrap_or(field);
        self.key_pos
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, p)| *p)
            .unwrap_or(self.pos)
    }
}

#[derive(Clone, Debug, Default)]
pub struct Triggers {
    pub cron: Vec<(String, croner::Cron)>,
    pub subjects: Vec<String>,
}

/// A validated workflow.
#[derive(Clone, Debug)]
pub struct Workflow {
    pub name: String,
    pub description: Option<String>,
    pub file: String,
    pub source: String,
    pub inputs: Vec<InputDef>,
    pub env: Vec<(String, Template)>,
    pub steps: Vec<Step>,
    pub outputs: Vec<(String, Template)>,
    pub on: Triggers,
    /// Most steps of one run at a time (the node's limit applies too).
    pub max_parallel: Option<usize>,
    /// The sources of sub-workflow files, by the path written in the file, so a run is self-contained.
    pub includes: BTreeMap<String, String>,
    /// Step ids to their positions in `steps`.
    index: HashMap<String, usize>,
}

impl Workflow {
    pub fn step(&self, id: &str) -> Option<&Step> {
        self.step_index(id).map(|i| &self.steps[i])
    }

    pub fn step_index(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    /// Checks and completes run inputs: unknown names, types, and defaults.
    pub fn resolve_inputs(&self, given: &BTreeMap<String, Value>) -> Result<Value, String> {
        let mut out = serde_json::Map::new();
        for k in given.keys() {
            if !self.inputs.iter().any(|i| &i.name == k) {
                let names: Vec<&str> = self.inputs.iter().map(|i| i.name.as_str()).collect();
                return Err(format!(
                    "workflow {} has no input {k:?}{}",
                    self.name,
                    if names.is_empty() {
                        String::from(" (it takes none)")
                    } else {
                        format!("; its inputs are {}", names.join(", "))
                    }
                ));
            }
        }
        for i in &self.inputs {
            let v = match given.get(&i.name) {
                Some(Value::String(s)) if i.ty != InputType::String => {
                    i.ty.coerce(s)
                        .map_err(|e| format!("input {}: {e}", i.name))?
                }
                Some(v) => v.clone(),
                None => match &i.default {
                    Some(d) => d.clone(),
                    None => {
                        return Err(format!(
                            "input {} ({}) is required: pass --input {}=<value>",
                            i.name,
                            i.ty.name(),
                            i.name
                        ));
                    }
                },
            };
            if !i.ty.accepts(&v) {
                return Err(format!(
                    "input {} must be {}, not {}",
                    i.name,
                    article(i.ty.name()),
                    v
                ));
            }
            out.insert(i.name.clone(), v);
        }
        Ok(Value::Object(out))
    }
}

/// Reads a duration: `250ms`, `10s`, `5m`, `2h`, `1m30s`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("a duration is empty".into());
    }
    if let Ok(n) = t.parse::<f64>() {
        return if n >= 0.0 && n.is_finite() && n < 1e9 {
            Ok(Duration::from_secs_f64(n))
        } else {
            Err(format!("{s:?} is not a duration"))
        };
    }
    let mut total = Duration::ZERO;
    let mut rest = t;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let unit_len = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len() - digits);
        let (num, unit) = (&rest[..digits], &rest[digits..digits + unit_len]);
        let n: f64 = num.parse().map_err(|_| {
            format!("{s:?} is not a duration (write it like 250ms, 10s, 5m, 2h or 1m30s)")
        })?;
        let secs = match unit {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            _ => {
                return Err(format!(
                    "{s:?} has an unknown unit {unit:?} (use ms, s, m, h or d)"
                ));
            }
        };
        if !(0.0..1e9).contains(&secs) {
            return Err(format!("{s:?} is too long"));
        }
        total += Duration::from_secs_f64(secs);
        if total.as_secs() >= 1_000_000_000 {
            return Err(format!("{s:?} is too long"));
        }
        rest = &rest[digits + unit_len..];
    }
    Ok(total)
}

/// Where names may be used in expressions, for the validator.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    /// A step field; `item` and `iteration` are allowed where the step has `for_each` or `loop`.
    Step { item: bool, iteration: bool },
    /// A step's `outputs` or `loop.until`: also the step's own `output`.
    StepResult { item: bool, iteration: bool },
    /// Workflow-level `outputs`.
    Outputs,
    /// Workflow-level `env`.
    Env,
}

/// The parser's state: the file and the problems found so far.
struct Checker {
    file: String,
    diags: Vec<Diagnostic>,
}

impl Checker {
    fn err(&mut self, pos: Pos, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            pos,
            message: message.into(),
            hint: None,
        });
    }

    fn hint(&mut self, pos: Pos, message: impl Into<String>, hint: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            pos,
            message: message.into(),
            hint: Some(hint.into()),
        });
    }

    /// The pairs of a mapping, checking its keys against `known`.
    fn map<'n>(&mut self, node: &'n Node, what: &str, known: &[&str]) -> Vec<(&'n str, &'n Node)> {
        let Kind::Map(pairs) = &node.kind else {
            self.err(
                node.pos,
                format!("{what} must be a mapping, not {}", node.describe()),
            );
            return Vec::new();
        };
        let mut out = Vec::new();
        for (k, v) in pairs {
            let Some(key) = k.as_scalar() else {
                self.err(k.pos, format!("a key of {what} must be text"));
                continue;
            };
            if !known.is_empty() && !known.contains(&key) {
                match did_you_mean(key, known) {
                    Some(s) => self.hint(
                        k.pos,
                        format!("unknown key `{key}` in {what}"),
                        format!("did you mean `{s}`?"),
                    ),
                    None => self.hint(
                        k.pos,
                        format!("unknown key `{key}` in {what}"),
                        format!("the keys are {}", known.join(", ")),
                    ),
                }
                continue;
            }
            out.push((key, v));
        }
        out
    }

    fn string(&mut self, node: &Node, what: &str) -> Option<String> {
        match &node.kind {
            Kind::Scalar { text, .. } if !matches!(node.to_json(), Value::Null) => {
                Some(text.clone())
            }
            _ => {
                self.err(
                    node.pos,
                    format!("{what} must be text, not {}", node.describe()),
                );
                None
            }
        }
    }

    fn template(&mut self, node: &Node, what: &str) -> Option<Template> {
        let text = self.string(node, what)?;
        match Template::parse(&text) {
            Ok(t) => Some(t),
            Err(e) => {
                self.expr_error(node, &text, e, what);
                None
            }
        }
    }

    fn expr_error(&mut self, node: &Node, text: &str, e: ExprError, what: &str) {
        let pos = offset_pos(node, text, e.offset);
        self.hint(
            pos,
            format!("bad expression in {what}: {}", e.message),
            "expressions are written ${{ inputs.x }}, ${{ steps.<id>.output }}, ${{ a == 'b' && !c }}",
        );
    }

    fn value_template(&mut self, node: &Node, what: &str) -> Option<ValueTemplate> {
        Some(match &node.kind {
            Kind::Scalar { text, .. } if node.to_json().is_string() => {
                match Template::parse(text) {
                    Ok(t) => ValueTemplate::Str(t),
                    Err(e) => {
                        self.expr_error(node, text, e, what);
                        return None;
                    }
                }
            }
            Kind::Scalar { .. } => ValueTemplate::Other(node.to_json()),
            Kind::Seq(items) => ValueTemplate::Array(
                items
                    .iter()
                    .map(|n| self.value_template(n, what))
                    .collect::<Option<_>>()?,
            ),
            Kind::Map(pairs) => ValueTemplate::Object(
                pairs
                    .iter()
                    .map(|(k, v)| {
                        Some((
                            k.as_scalar().unwrap_or_default().to_owned(),
                            self.value_template(v, what)?,
                        ))
                    })
                    .collect::<Option<_>>()?,
            ),
        })
    }

    fn duration(&mut self, node: &Node, what: &str) -> Option<Duration> {
        let text = match &node.kind {
            Kind::Scalar { text, .. } => text.clone(),
            _ => {
                self.err(
                    node.pos,
                    format!(
                        "{what} must be a duration like 10s, not {}",
                        node.describe()
                    ),
                );
                return None;
            }
        };
        match parse_duration(&text) {
            Ok(d) => Some(d),
            Err(e) => {
                self.err(node.pos, format!("{what}: {e}"));
                None
            }
        }
    }

    fn uint(&mut self, node: &Node, what: &str, min: u64, max: u64) -> Option<u64> {
        match node.to_json().as_u64() {
            Some(n) if (min..=max).contains(&n) => Some(n),
            _ => {
                self.err(
                    node.pos,
                    format!(
                        "{what} must be a whole number from {min} to {max}, not {}",
                        show(node)
                    ),
                );
                None
            }
        }
    }

    fn boolean(&mut self, node: &Node, what: &str) -> Option<bool> {
        match node.to_json() {
            Value::Bool(b) => Some(b),
            _ => {
                self.err(
                    node.pos,
                    format!("{what} must be true or false, not {}", show(node)),
                );
                None
            }
        }
    }

    fn string_map(&mut self, node: &Node, what: &str) -> Vec<(String, Template)> {
        self.map(node, what, &[])
            .into_iter()
            .filter_map(|(k, v)| {
                let t = match v.to_json() {
                    Value::String(_) => self.template(v, &format!("{what}.{k}"))?,
                    Value::Number(_) | Value::Bool(_) => Template::text(&v.to_json().to_string()),
                    _ => {
                        self.err(
                            v.pos,
                            format!("{what}.{k} must be text, not {}", v.describe()),
                        );
                        return None;
                    }
                };
                Some((k.to_owned(), t))
            })
            .collect()
    }
}

fn show(node: &Node) -> String {
    match &node.kind {
        Kind::Scalar { text, .. } => format!("{text:?}"),
        _ => node.describe().into(),
    }
}

/// The position of byte `offset` of a scalar's text, when the scalar is on one line.
fn offset_pos(node: &Node, text: &str, offset: usize) -> Pos {
    if text.contains('\n') {
        return node.pos;
    }
    let quoted = matches!(node.kind, Kind::Scalar { quoted: true, .. });
    let chars = text.get(..offset).map(|s| s.chars().count()).unwrap_or(0) as u32;
    Pos {
        line: node.pos.line,
        col: node.pos.col + chars + u32::from(quoted),
    }
}

/// The closest of `known` to `word`, if it is close enough to be a typo.
pub fn did_you_mean<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|k| (levenshtein(word, k), *k))
        .filter(|(d, k)| *d <= (k.len().max(word.len()) / 3).max(1) && *d < word.len())
        .min()
        .map(|(_, k)| k)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Whether `s` is a valid step id, workflow name or input name: a letter or `_`, then letters, digits, `_` and `-`.
pub fn valid_id(s: &str) -> bool {
    let mut c = s.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && s.len() <= 64
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

const TOP_KEYS: &[&str] = &[
    "name",
    "description",
    "inputs",
    "env",
    "on",
    "steps",
    "outputs",
    "max_parallel",
];
const STEP_KEYS: &[&str] = &[
    "id",
    "name",
    "needs",
    "if",
    "for_each",
    "max_parallel",
    "loop",
    "retry",
    "timeout",
    "continue_on_error",
    "env",
    "outputs",
    "run",
    "llm",
    "http",
    "sleep",
    "wait_for",
    "approval",
    "workflow",
    "publish",
    "agent",
    "tool",
];

/// How sub-workflow files are read while parsing (the file system, or a stored bundle when a run resumes).
pub trait Loader {
    fn load(&self, path: &str) -> Result<String, String>;
}

/// Reads sub-workflow files relative to the folder of the file that names them.
pub struct FsLoader {
    pub base: PathBuf,
}

impl Loader for FsLoader {
    fn load(&self, path: &str) -> Result<String, String> {
        std::fs::read_to_string(self.base.join(path))
            .map_err(|e| format!("cannot read {}: {e}", self.base.join(path).display()))
    }
}

/// Reads sub-workflow sources from a run's stored bundle.
pub struct BundleLoader<'a>(pub &'a BTreeMap<String, String>);

impl Loader for BundleLoader<'_> {
    fn load(&self, path: &str) -> Result<String, String> {
        self.0
            .get(path)
            .cloned()
            .ok_or_else(|| format!("the run's stored files do not hold {path}"))
    }
}

/// Reads and validates a workflow file from disk.
pub fn load_file(path: &Path) -> Result<Workflow, Vec<Diagnostic>> {
    let file = path.display().to_string();
    let source = std::fs::read_to_string(path).map_err(|e| {
        vec![Diagnostic {
            file: file.clone(),
            pos: Pos { line: 1, col: 1 },
            message: format!("cannot read the file: {e}"),
            hint: None,
        }]
    })?;
    let base = path.parent().unwrap_or(Path::new(".")).to_owned();
    parse(&file, &source, &FsLoader { base })
}

/// Parses and validates a workflow. `file` is the name used in messages.
pub fn parse(file: &str, source: &str, loader: &dyn Loader) -> Result<Workflow, Vec<Diagnostic>> {
    parse_nested(file, source, loader, &mut vec![file.to_owned()])
}

fn parse_nested(
    file: &str,
    source: &str,
    loader: &dyn Loader,
    chain: &mut Vec<String>,
) -> Result<Workflow, Vec<Diagnostic>> {
    let mut c = Checker {
        file: file.to_owned(),
        diags: Vec::new(),
    };
    let root = match yaml::parse(source) {
        Ok(r) => r,
        Err(e) => {
            c.err(e.pos, format!("YAML syntax: {}", e.message));
            return Err(c.diags);
        }
    };
    let top = c.map(&root, "the workflow", TOP_KEYS);
    let get = |k: &str| top.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);

    let name = match get("name") {
        Some(n) => {
            let s = c.string(n, "name").unwrap_or_default();
            if !s.is_empty() && !valid_id(&s) {
                c.hint(
                    n.pos,
                    format!("name {s:?} is not a valid workflow name"),
                    "use letters, digits, `_` and `-`, starting with a letter",
                );
            }
            s
        }
        None => {
            c.hint(
                root.pos,
                "the workflow has no `name`",
                "add `name: my-workflow` at the top",
            );
            String::new()
        }
    };
    let description = get("description").and_then(|d| c.string(d, "description"));

    let mut inputs = Vec::new();
    if let Some(node) = get("inputs") {
        for (k, v) in c.map(node, "inputs", &[]) {
            if !valid_id(k) {
                c.err(
                    v.pos,
                    format!("input name {k:?} is not valid: use letters, digits, `_` and `-`"),
                );
            }
            let (ty_node, default, description) = match &v.kind {
                Kind::Scalar { .. } => (Some(v), None, None),
                Kind::Map(_) => {
                    let m = c.map(
                        v,
                        &format!("input {k}"),
                        &["type", "default", "description"],
                    );
                    let f = |key: &str| m.iter().find(|(x, _)| *x == key).map(|(_, n)| *n);
                    (
                        f("type"),
                        f("default"),
                        f("description").and_then(|d| d.as_scalar().map(str::to_owned)),
                    )
                }
                Kind::Seq(_) => {
                    c.err(
                        v.pos,
                        format!("input {k} must be a type name or a mapping with `type`"),
                    );
                    continue;
                }
            };
            let ty = match ty_node.and_then(|t| t.as_scalar()) {
                None => InputType::String,
                Some(t) => match InputType::ALL.iter().find(|(n, _)| *n == t) {
                    Some((_, ty)) => *ty,
                    None => {
                        let names: Vec<&str> = InputType::ALL.iter().map(|x| x.0).collect();
                        c.hint(
                            ty_node.map(|n| n.pos).unwrap_or(v.pos),
                            format!("input {k} has unknown type {t:?}"),
                            format!("the types are {}", names.join(", ")),
                        );
                        InputType::String
                    }
                },
            };
            let default = default.map(|d| (d.pos, d.to_json()));
            if let Some((pos, d)) = &default
                && !ty.accepts(d)
            {
                c.err(
                    *pos,
                    format!(
                        "the default of input {k} must be {}, not {d}",
                        article(ty.name())
                    ),
                );
            }
            inputs.push(InputDef {
                name: k.to_owned(),
                ty,
                default: default.map(|d| d.1),
                description,
            });
        }
    }

    let env = get("env")
        .map(|e| c.string_map(e, "env"))
        .unwrap_or_default();
    let max_parallel = get("max_parallel")
        .and_then(|m| c.uint(m, "max_parallel", 1, 100_000))
        .map(|m| m as usize);

    let mut on = Triggers::default();
    if let Some(node) = get("on") {
        for (k, v) in c.map(node, "on", &["cron", "subject", "manual"]) {
            let items: Vec<&Node> = match &v.kind {
                Kind::Seq(items) => items.iter().collect(),
                _ => vec![v],
            };
            for item in items {
                match k {
                    "cron" => {
                        let Some(text) = c.string(item, "on.cron") else {
                            continue;
                        };
                        match croner::parser::CronParser::new().parse(&text) {
                            Ok(cron) => on.cron.push((text, cron)),
                            Err(e) => c.hint(
                                item.pos,
                                format!("on.cron {text:?} is not a cron schedule: {e}"),
                                "five fields: minute hour day-of-month month day-of-week, e.g. \"*/5 * * * *\"",
                            ),
                        }
                    }
                    "subject" => {
                        let Some(text) = c.string(item, "on.subject") else {
                            continue;
                        };
                        match noa_bus::Pattern::new(&text) {
                            Ok(_) => on.subjects.push(text),
                            Err(e) => c.err(item.pos, format!("on.subject: {e}")),
                        }
                    }
                    _ => {
                        c.boolean(item, "on.manual");
                    }
                }
            }
        }
    }

    // Steps: first their shapes, then the graph, then the expressions (which need the graph).
    let mut steps: Vec<Step> = Vec::new();
    let mut seen: HashMap<String, Pos> = HashMap::new();
    let mut needs_pos: Vec<Vec<(String, Pos)>> = Vec::new();
    let mut includes = BTreeMap::new();
    match get("steps") {
        None => c.hint(
            root.pos,
            "the workflow has no `steps`",
            "add `steps:` with at least one step",
        ),
        Some(node) => match &node.kind {
            Kind::Seq(items) if items.is_empty() => c.err(node.pos, "`steps` is empty"),
            Kind::Seq(items) => {
                for item in items {
                    if let Some((step, needs)) =
                        parse_step(&mut c, item, loader, chain, &mut includes)
                    {
                        if let Some(first) = seen.get(&step.id) {
                            c.err(
                                step.pos,
                                format!("duplicate step id `{}` (first at {first})", step.id),
                            );
                            continue;
                        }
                        seen.insert(step.id.clone(), step.pos);
                        steps.push(step);
                        needs_pos.push(needs);
                    }
                }
            }
            _ => c.err(
                node.pos,
                format!("`steps` must be a list, not {}", node.describe()),
            ),
        },
    }

    // Every `needs` names a step.
    let ids: Vec<&str> = steps.iter().map(|s| s.id.as_str()).collect();
    for (i, needs) in needs_pos.iter().enumerate() {
        for (n, pos) in needs {
            if n == &steps[i].id {
                c.err(*pos, format!("step `{n}` needs itself"));
            } else if !ids.contains(&n.as_str()) {
                match did_you_mean(n, &ids) {
                    Some(s) => c.hint(
                        *pos,
                        format!("step `{}` needs `{n}`, which is not a step", steps[i].id),
                        format!("did you mean `{s}`?"),
                    ),
                    None => c.hint(
                        *pos,
                        format!("step `{}` needs `{n}`, which is not a step", steps[i].id),
                        format!("the steps are {}", ids.join(", ")),
                    ),
                }
            }
        }
    }
    let index: HashMap<&str, usize> = ids.iter().enumerate().map(|(i, s)| (*s, i)).collect();
    if let Some(cycle) = find_cycle(&steps, &index) {
        let names: Vec<&str> = cycle.iter().map(|i| steps[*i].id.as_str()).collect();
        c.hint(
            steps[cycle[0]].pos,
            format!(
                "the steps form a cycle: {} → {}",
                names.join(" → "),
                names[0]
            ),
            "remove one of these `needs`",
        );
    } else {
        // Expressions may read only steps that are sure to have finished: transitive needs.
        let ancestors = ancestors(&steps, &index);
        for (i, step) in steps.iter().enumerate() {
            check_step_exprs(&mut c, step, &ancestors[i], &ids, &inputs);
        }
    }

    let mut outputs = Vec::new();
    if let Some(node) = get("outputs") {
        for (k, v) in c.map(node, "outputs", &[]) {
            if let Some(t) = c.template(v, &format!("outputs.{k}")) {
                check_template(
                    &mut c,
                    v,
                    &t,
                    Place::Outputs,
                    None,
                    &ids,
                    &inputs,
                    &format!("outputs.{k}"),
                );
                outputs.push((k.to_owned(), t));
            }
        }
    }
    if let Some(node) = get("env") {
        for (k, t) in &env {
            check_template(
                &mut c,
                node,
                t,
                Place::Env,
                None,
                &ids,
                &inputs,
                &format!("env.{k}"),
            );
        }
    }

    if !c.diags.is_empty() {
        c.diags.sort_by_key(|d| d.pos);
        c.diags.dedup();
        return Err(c.diags);
    }
    let index = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.clone(), i))
        .collect();
    Ok(Workflow {
        index,
        name,
        description,
        file: file.to_owned(),
        source: source.to_owned(),
        inputs,
        env,
        steps,
        outputs,
        on,
        max_parallel,
        includes,
    })
}

type Needs = Vec<(String, Pos)>;

fn parse_step(
    c: &mut Checker,
    node: &Node,
    loader: &dyn Loader,
    chain: &mut Vec<String>,
    includes: &mut BTreeMap<String, String>,
) -> Option<(Step, Needs)> {
    let m = c.map(node, "a step", STEP_KEYS);
    if !matches!(node.kind, Kind::Map(_)) {
        return None;
    }
    let get = |k: &str| m.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
    let id = match get("id") {
        None => {
            c.hint(
                node.pos,
                "a step has no `id`",
                "give every step a unique `id: <name>`",
            );
            return None;
        }
        Some(n) => {
            let id = c.string(n, "id")?;
            if !valid_id(&id) {
                c.hint(
                    n.pos,
                    format!("step id {id:?} is not valid"),
                    "use letters, digits, `_` and `-`, starting with a letter",
                );
                return None;
            }
            id
        }
    };
    let what = |k: &str| format!("step `{id}`: {k}");

    let kinds: Vec<(&str, &Node)> = m
        .iter()
        .filter(|(k, _)| STEP_KINDS.contains(k) || RESERVED_KINDS.contains(k))
        .map(|(k, v)| (*k, *v))
        .collect();
    let (kind_name, kind_node) = match kinds.as_slice() {
        [] => {
            c.hint(
                node.pos,
                format!("step `{id}` says nothing to do"),
                format!("give it one of {}", STEP_KINDS.join(", ")),
            );
            return None;
        }
        [one] => *one,
        [_, second, ..] => {
            let names: Vec<&str> = kinds.iter().map(|k| k.0).collect();
            c.err(
                second.1.pos,
                format!(
                    "step `{id}` has more than one kind ({}); a step does one thing",
                    names.join(", ")
                ),
            );
            return None;
        }
    };
    let kind = match kind_name {
        "run" => StepKind::Run {
            command: c.template(kind_node, &what("run"))?,
        },
        "llm" => {
            let f = c.map(
                kind_node,
                &what("llm"),
                &[
                    "model",
                    "prompt",
                    "system",
                    "max_tokens",
                    "temperature",
                    "seed",
                ],
            );
            let g = |k: &str| f.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
            let Some(prompt) = g("prompt") else {
                c.err(kind_node.pos, format!("step `{id}`: llm needs a `prompt`"));
                return None;
            };
            StepKind::Llm {
                model: g("model").and_then(|n| c.template(n, &what("llm.model"))),
                prompt: c.template(prompt, &what("llm.prompt"))?,
                system: g("system").and_then(|n| c.template(n, &what("llm.system"))),
                max_tokens: g("max_tokens")
                    .and_then(|n| c.uint(n, &what("llm.max_tokens"), 1, 32_768)),
                temperature: match g("temperature") {
                    Some(n) => match n.to_json().as_f64() {
                        Some(t) if (0.0..=5.0).contains(&t) => Some(t),
                        _ => {
                            c.err(
                                n.pos,
                                format!(
                                    "step `{id}`: llm.temperature must be a number from 0 to 5"
                                ),
                            );
                            None
                        }
                    },
                    None => None,
                },
                seed: g("seed").and_then(|n| c.uint(n, &what("llm.seed"), 0, u32::MAX as u64)),
            }
        }
        "http" => {
            let f = c.map(
                kind_node,
                &what("http"),
                &["method", "url", "headers", "body"],
            );
            let g = |k: &str| f.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
            let method = match g("method") {
                Some(n) => {
                    let m = c.string(n, &what("http.method"))?.to_uppercase();
                    if !["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD"].contains(&m.as_str()) {
                        c.err(n.pos, format!("step `{id}`: http.method {m:?} is not one of GET, POST, PUT, PATCH, DELETE, HEAD"));
                    }
                    m
                }
                None => "GET".into(),
            };
            let Some(url) = g("url") else {
                c.err(kind_node.pos, format!("step `{id}`: http needs a `url`"));
                return None;
            };
            let url_t = c.template(url, &what("http.url"))?;
            if let Some(lit) = url_t
                .is_literal()
                .then(|| url.as_scalar().unwrap_or_default())
                && !(lit.starts_with("http://") || lit.starts_with("https://"))
            {
                c.err(
                    url.pos,
                    format!("step `{id}`: http.url {lit:?} must start with http:// or https://"),
                );
            }
            StepKind::Http {
                method,
                url: url_t,
                headers: g("headers")
                    .map(|h| c.string_map(h, &what("http.headers")))
                    .unwrap_or_default(),
                body: g("body").and_then(|b| c.value_template(b, &what("http.body"))),
            }
        }
        "sleep" => StepKind::Sleep {
            duration: c.duration(kind_node, &what("sleep"))?,
        },
        "wait_for" => match &kind_node.kind {
            Kind::Map(_) => {
                let f = c.map(kind_node, &what("wait_for"), &["subject", "timeout"]);
                let g = |k: &str| f.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
                let Some(subject) = g("subject") else {
                    c.err(
                        kind_node.pos,
                        format!("step `{id}`: wait_for needs a `subject`"),
                    );
                    return None;
                };
                StepKind::WaitFor {
                    subject: c.template(subject, &what("wait_for.subject"))?,
                    timeout: g("timeout").and_then(|t| c.duration(t, &what("wait_for.timeout"))),
                }
            }
            _ => StepKind::WaitFor {
                subject: c.template(kind_node, &what("wait_for"))?,
                timeout: None,
            },
        },
        "approval" => match &kind_node.kind {
            Kind::Map(_) => {
                let f = c.map(kind_node, &what("approval"), &["message"]);
                StepKind::Approval {
                    message: f
                        .first()
                        .and_then(|(_, n)| c.template(n, &what("approval.message"))),
                }
            }
            _ => match kind_node.to_json() {
                Value::Bool(true) | Value::Null => StepKind::Approval { message: None },
                Value::String(_) => StepKind::Approval {
                    message: c.template(kind_node, &what("approval")),
                },
                _ => {
                    c.err(kind_node.pos, format!("step `{id}`: approval must be true, a message, or a mapping with `message`"));
                    return None;
                }
            },
        },
        "workflow" => {
            let f = c.map(kind_node, &what("workflow"), &["file", "inputs"]);
            let g = |k: &str| f.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
            let Some(file_node) = g("file") else {
                c.err(
                    kind_node.pos,
                    format!("step `{id}`: workflow needs a `file` (relative to this file)"),
                );
                return None;
            };
            let file = c.string(file_node, &what("workflow.file"))?;
            if chain.contains(&file) || chain.len() > 8 {
                c.err(
                    file_node.pos,
                    format!(
                        "step `{id}`: workflow {file} includes itself ({} → {file})",
                        chain.join(" → ")
                    ),
                );
                return None;
            }
            let source = match loader.load(&file) {
                Ok(s) => s,
                Err(e) => {
                    c.err(file_node.pos, format!("step `{id}`: {e}"));
                    return None;
                }
            };
            chain.push(file.clone());
            let sub = parse_nested(&file, &source, loader, chain);
            chain.pop();
            let def = match sub {
                Ok(d) => d,
                Err(diags) => {
                    c.diags.extend(diags);
                    return None;
                }
            };
            includes.insert(file.clone(), source);
            for (k, v) in &def.includes {
                includes.insert(k.clone(), v.clone());
            }
            let inputs: Vec<(String, ValueTemplate)> = g("inputs")
                .map(|n| {
                    c.map(n, &what("workflow.inputs"), &[])
                        .into_iter()
                        .filter_map(|(k, v)| {
                            if !def.inputs.iter().any(|i| i.name == k) {
                                c.err(
                                    v.pos,
                                    format!("step `{id}`: workflow {file} has no input `{k}`"),
                                );
                            }
                            Some((k.to_owned(), c.value_template(v, &what("workflow.inputs"))?))
                        })
                        .collect()
                })
                .unwrap_or_default();
            StepKind::Workflow {
                file,
                def: Arc::new(def),
                inputs,
            }
        }
        "publish" => {
            let f = c.map(kind_node, &what("publish"), &["subject", "payload"]);
            let g = |k: &str| f.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
            let Some(subject) = g("subject") else {
                c.err(
                    kind_node.pos,
                    format!("step `{id}`: publish needs a `subject`"),
                );
                return None;
            };
            let subject_t = c.template(subject, &what("publish.subject"))?;
            if subject_t.is_literal()
                && let Err(e) = noa_bus::Subject::new(subject.as_scalar().unwrap_or_default())
            {
                c.err(subject.pos, format!("step `{id}`: publish.subject: {e}"));
            }
            StepKind::Publish {
                subject: subject_t,
                payload: g("payload")
                    .and_then(|p| c.value_template(p, &what("publish.payload")))
                    .unwrap_or(ValueTemplate::Other(Value::Null)),
            }
        }
        reserved => {
            c.hint(
                kind_node.pos,
                format!("step `{id}`: the `{reserved}` step kind is not available in this version of noa"),
                format!("use one of {}", STEP_KINDS.join(", ")),
            );
            return None;
        }
    };

    // Sleeps and approvals are kept by the engine, not run: these keys would silently do nothing.
    if matches!(kind, StepKind::Sleep { .. } | StepKind::Approval { .. }) {
        for key in ["for_each", "loop", "retry", "timeout", "max_parallel"] {
            if let Some((k, n)) = m.iter().find(|(k, _)| *k == key) {
                c.err(
                    n.pos,
                    format!(
                        "step `{id}`: `{k}` does not apply to {} step",
                        if kind.name() == "sleep" {
                            "a sleep"
                        } else {
                            "an approval"
                        }
                    ),
                );
            }
        }
    }
    let mut needs = Vec::new();
    if let Some(n) = get("needs") {
        let items: Vec<&Node> = match &n.kind {
            Kind::Seq(items) => items.iter().collect(),
            _ => vec![n],
        };
        for item in items {
            if let Some(s) = c.string(item, &what("needs")) {
                needs.push((s, item.pos));
            }
        }
    }
    let for_each = get("for_each").and_then(|n| match &n.kind {
        Kind::Seq(items) => Some(ForEach::List(items.iter().map(Node::to_json).collect())),
        _ => c.template(n, &what("for_each")).map(ForEach::Expr),
    });
    let max_parallel = get("max_parallel")
        .and_then(|n| c.uint(n, &what("max_parallel"), 1, 100_000))
        .map(|m| m as usize);
    if let (Some(n), None) = (get("max_parallel"), &for_each) {
        c.hint(
            n.pos,
            format!("step `{id}`: max_parallel applies only to a step with for_each"),
            "remove it, or set max_parallel on the workflow",
        );
    }
    let loop_spec = get("loop").and_then(|n| {
        let f = c.map(n, &what("loop"), &["until", "max_iterations"]);
        let g = |k: &str| f.iter().find(|(key, _)| *key == k).map(|(_, v)| *v);
        let Some(until) = g("until") else {
            c.err(
                n.pos,
                format!(
                    "step `{id}`: loop needs `until` (an expression over `output` and `iteration`)"
                ),
            );
            return None;
        };
        let Some(max) = g("max_iterations") else {
            c.hint(
                n.pos,
                format!("step `{id}`: loop needs `max_iterations`"),
                "every loop has a bound, e.g. max_iterations: 10",
            );
            return None;
        };
        Some(LoopSpec {
            until: c.template(until, &what("loop.until"))?,
            max_iterations: c.uint(max, &what("loop.max_iterations"), 1, 10_000)? as u32,
        })
    });
    if let (Some(_), Some(n)) = (&for_each, get("loop")) {
        c.err(
            n.pos,
            format!("step `{id}` has both for_each and loop; use one"),
        );
    }
    let mut retry = Retry::default();
    if let Some(n) = get("retry") {
        match &n.kind {
            Kind::Map(_) => {
                for (k, v) in c.map(
                    n,
                    &what("retry"),
                    &["attempts", "backoff", "factor", "max_backoff"],
                ) {
                    match k {
                        "attempts" => {
                            retry.attempts =
                                c.uint(v, &what("retry.attempts"), 1, 100).unwrap_or(1) as u32
                        }
                        "backoff" => {
                            retry.backoff = c
                                .duration(v, &what("retry.backoff"))
                                .unwrap_or(retry.backoff)
                        }
                        "max_backoff" => {
                            retry.max_backoff = c
                                .duration(v, &what("retry.max_backoff"))
                                .unwrap_or(retry.max_backoff)
                        }
                        _ => match v.to_json().as_f64() {
                            Some(f) if (1.0..=10.0).contains(&f) => retry.factor = f,
                            _ => c.err(
                                v.pos,
                                format!("step `{id}`: retry.factor must be a number from 1 to 10"),
                            ),
                        },
                    }
                }
            }
            _ => retry.attempts = c.uint(n, &what("retry"), 1, 100).unwrap_or(1) as u32,
        }
    }
    let step = Step {
        pos: node.pos,
        name: get("name").and_then(|n| c.string(n, &what("name"))),
        needs: needs.iter().map(|n| n.0.clone()).collect(),
        kind,
        condition: get("if").and_then(|n| {
            // `if:` may be written with or without `${{ }}`.
            let text = c.string(n, &what("if"))?;
            let wrapped = if text.contains("${{") {
                text.clone()
            } else {
                format!("${{{{ {text} }}}}")
            };
            match Template::parse(&wrapped) {
                Ok(t) => Some(t),
                Err(e) => {
                    let offset = if text.contains("${{") {
                        e.offset
                    } else {
                        e.offset.saturating_sub(4)
                    };
                    c.expr_error(
                        n,
                        &text,
                        ExprError {
                            offset,
                            message: e.message,
                        },
                        &what("if"),
                    );
                    None
                }
            }
        }),
        for_each,
        max_parallel,
        loop_spec,
        retry,
        timeout: get("timeout").and_then(|n| c.duration(n, &what("timeout"))),
        continue_on_error: get("continue_on_error")
            .and_then(|n| c.boolean(n, &what("continue_on_error")))
            .unwrap_or(false),
        env: get("env")
            .map(|n| c.string_map(n, &what("env")))
            .unwrap_or_default(),
        outputs: get("outputs")
            .map(|n| c.string_map(n, &what("outputs")))
            .unwrap_or_default(),
        key_pos: m.iter().map(|(k, v)| ((*k).to_owned(), v.pos)).collect(),
        id,
    };
    for (k, _) in &step.env {
        if !valid_env_name(k) {
            c.err(
                step.pos,
                format!("step `{}`: env name {k:?} is not valid", step.id),
            );
        }
    }
    Some((step, needs))
}

/// Whether `k` is a valid environment variable name.
pub fn valid_env_name(k: &str) -> bool {
    let mut c = k.chars();
    c.next()
        .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !k.starts_with("NOA_")
}

fn find_cycle(steps: &[Step], index: &HashMap<&str, usize>) -> Option<Vec<usize>> {
    // Iterative DFS with colors; the cycle is read off the stack.
    let n = steps.len();
    let mut color = vec![0u8; n];
    for start in 0..n {
        if color[start] != 0 {
            continue;
        }
        let mut stack: Vec<(usize, usize)> = vec![(start, 0)];
        color[start] = 1;
        while let Some((node, next)) = stack.last_mut() {
            let deps: Vec<usize> = steps[*node]
                .needs
                .iter()
                .filter_map(|d| index.get(d.as_str()).copied())
                .collect();
            if *next < deps.len() {
                let d = deps[*next];
                *next += 1;
                match color[d] {
                    0 => {
                        color[d] = 1;
                        stack.push((d, 0));
                    }
                    1 => {
                        let from = stack.iter().position(|(s, _)| *s == d).unwrap_or(0);
                        let mut cycle: Vec<usize> = stack[from..].iter().map(|(s, _)| *s).collect();
                        // Name the cycle in the direction of the arrows: a step before what it needs.
                        cycle.reverse();
                        let min = cycle
                            .iter()
                            .enumerate()
                            .min_by_key(|(_, s)| **s)
                            .map(|(i, _)| i)
                            .unwrap_or(0);
                        cycle.rotate_left(min);
                        return Some(cycle);
                    }
                    _ => {}
                }
            } else {
                color[*node] = 2;
                stack.pop();
            }
        }
    }
    None
}

/// For each step, the set of steps it transitively needs.
fn ancestors(steps: &[Step], index: &HashMap<&str, usize>) -> Vec<HashSet<usize>> {
    let mut memo: Vec<Option<HashSet<usize>>> = vec![None; steps.len()];
    fn go(
        i: usize,
        steps: &[Step],
        index: &HashMap<&str, usize>,
        memo: &mut Vec<Option<HashSet<usize>>>,
    ) -> HashSet<usize> {
        if let Some(s) = &memo[i] {
            return s.clone();
        }
        let mut out = HashSet::new();
        for d in &steps[i].needs {
            if let Some(&j) = index.get(d.as_str()) {
                out.insert(j);
                out.extend(go(j, steps, index, memo));
            }
        }
        memo[i] = Some(out.clone());
        out
    }
    (0..steps.len())
        .map(|i| go(i, steps, index, &mut memo))
        .collect()
}

fn step_templates(step: &Step) -> Vec<(&'static str, &Template)> {
    let mut out: Vec<(&'static str, &Template)> = Vec::new();
    let mut vts: Vec<&Template> = Vec::new();
    match &step.kind {
        StepKind::Run { command } => out.push(("run", command)),
        StepKind::Llm {
            model,
            prompt,
            system,
            ..
        } => {
            out.push(("llm.prompt", prompt));
            if let Some(m) = model {
                out.push(("llm.model", m));
            }
            if let Some(s) = system {
                out.push(("llm.system", s));
            }
        }
        StepKind::Http {
            url, headers, body, ..
        } => {
            out.push(("http.url", url));
            headers
                .iter()
                .for_each(|(_, t)| out.push(("http.headers", t)));
            if let Some(b) = body {
                b.templates(&mut vts);
            }
            vts.drain(..).for_each(|t| out.push(("http.body", t)));
        }
        StepKind::Sleep { .. } => {}
        StepKind::WaitFor { subject, .. } => out.push(("wait_for", subject)),
        StepKind::Approval { message } => {
            if let Some(m) = message {
                out.push(("approval", m));
            }
        }
        StepKind::Workflow { inputs, .. } => {
            inputs.iter().for_each(|(_, v)| v.templates(&mut vts));
            vts.drain(..).for_each(|t| out.push(("workflow.inputs", t)));
        }
        StepKind::Publish { subject, payload } => {
            out.push(("publish.subject", subject));
            payload.templates(&mut vts);
            vts.drain(..).for_each(|t| out.push(("publish.payload", t)));
        }
    }
    step.env.iter().for_each(|(_, t)| out.push(("env", t)));
    if let Some(t) = &step.condition {
        out.push(("if", t));
    }
    if let Some(ForEach::Expr(t)) = &step.for_each {
        out.push(("for_each", t));
    }
    out
}

/// Every template of a step: its kind's, `env`, `if`, `for_each`, `outputs` and `loop.until`.
pub(crate) fn step_all_templates(step: &Step) -> Vec<&Template> {
    let mut out: Vec<&Template> = step_templates(step).into_iter().map(|(_, t)| t).collect();
    out.extend(step.outputs.iter().map(|(_, t)| t));
    if let Some(l) = &step.loop_spec {
        out.push(&l.until);
    }
    out
}

fn check_step_exprs(
    c: &mut Checker,
    step: &Step,
    ancestors: &HashSet<usize>,
    ids: &[&str],
    inputs: &[InputDef],
) {
    let item = step.for_each.is_some();
    let iteration = step.loop_spec.is_some();
    let at = |field: &str| Node {
        pos: step.pos_of(field),
        kind: Kind::Seq(Vec::new()),
    };
    let ctx = Some((step, ancestors));
    for (field, t) in step_templates(step) {
        // `for_each` itself is evaluated before there is an item.
        let place = Place::Step {
            item: item && field != "for_each",
            iteration,
        };
        let what = format!("step `{}`: {field}", step.id);
        check_template(c, &at(field), t, place, ctx, ids, inputs, &what);
    }
    for (k, t) in &step.outputs {
        let place = Place::StepResult {
            item: false,
            iteration,
        };
        let what = format!("step `{}`: outputs.{k}", step.id);
        check_template(c, &at("outputs"), t, place, ctx, ids, inputs, &what);
    }
    if let Some(l) = &step.loop_spec {
        let place = Place::StepResult {
            item: false,
            iteration: true,
        };
        let what = format!("step `{}`: loop.until", step.id);
        check_template(c, &at("loop"), &l.until, place, ctx, ids, inputs, &what);
    }
}

#[allow(clippy::too_many_arguments)]
fn check_template(
    c: &mut Checker,
    node: &Node,
    t: &Template,
    place: Place,
    step: Option<(&Step, &HashSet<usize>)>,
    ids: &[&str],
    inputs: &[InputDef],
    what: &str,
) {
    let mut refs = Vec::new();
    t.exprs().for_each(|e| e.refs(&mut refs));
    for (root, name) in refs {
        let ok_roots: &[&str] = match place {
            Place::Step { item, iteration } | Place::StepResult { item, iteration } => {
                let result = matches!(place, Place::StepResult { .. });
                match (item, iteration, result) {
                    (true, _, false) => &["inputs", "steps", "env", "run", "item", "index"],
                    (_, true, false) => &["inputs", "steps", "env", "run", "iteration"],
                    (_, true, true) => &["inputs", "steps", "env", "run", "iteration", "output"],
                    (_, false, true) => &["inputs", "steps", "env", "run", "output"],
                    _ => &["inputs", "steps", "env", "run"],
                }
            }
            Place::Outputs => &["inputs", "steps", "env", "run"],
            Place::Env => &["inputs", "run"],
        };
        if !ok_roots.contains(&root.as_str()) {
            let hint = match root.as_str() {
                "item" | "index" => "`item` exists only in a step with for_each".to_owned(),
                "iteration" => "`iteration` exists only in a step with loop".to_owned(),
                "output" => {
                    "`output` (the step's own output) exists only in its `outputs` and `loop.until`"
                        .to_owned()
                }
                _ => format!("the names here are {}", ok_roots.join(", ")),
            };
            c.hint(node.pos, format!("{what}: unknown name `{root}`"), hint);
            continue;
        }
        match (root.as_str(), name) {
            ("inputs", Some(n)) if !inputs.iter().any(|i| i.name == n) => {
                let names: Vec<&str> = inputs.iter().map(|i| i.name.as_str()).collect();
                let hint = did_you_mean(&n, &names)
                    .map(|s| format!("did you mean `{s}`?"))
                    .unwrap_or_else(|| {
                        if names.is_empty() {
                            "declare it under `inputs:`".into()
                        } else {
                            format!("the inputs are {}", names.join(", "))
                        }
                    });
                c.hint(
                    node.pos,
                    format!("{what}: `inputs.{n}` is not an input"),
                    hint,
                );
            }
            ("steps", Some(n)) => {
                let Some(j) = ids.iter().position(|s| *s == n) else {
                    let hint = did_you_mean(&n, ids)
                        .map(|s| format!("did you mean `{s}`?"))
                        .unwrap_or_else(|| format!("the steps are {}", ids.join(", ")));
                    c.hint(node.pos, format!("{what}: `steps.{n}` is not a step"), hint);
                    continue;
                };
                if let Some((step, ancestors)) = step
                    && !ancestors.contains(&j)
                {
                    if step.id == n {
                        c.hint(
                            node.pos,
                            format!(
                                "{what}: a step cannot read its own result through `steps.{n}`"
                            ),
                            "use `output` in the step's `outputs` or `loop.until`",
                        );
                    } else {
                        c.hint(
                            node.pos,
                            format!(
                                "{what}: reads `steps.{n}`, but step `{}` does not need `{n}`",
                                step.id
                            ),
                            format!("add `{n}` to the step's `needs`, so it has finished first"),
                        );
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
#[path = "def_tests.rs"]
mod tests;
