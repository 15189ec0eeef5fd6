//! A YAML document as a tree of nodes that remember where they are, so that every error can name
//! line and column. Built from `yaml-rust2`'s event parser; anchors and aliases are expanded.

use serde_json::Value;
use std::collections::HashMap;
use std::fmt;
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

/// A place in the source: line and column, both counted from 1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Pos {
    pub line: u32,
    pub col: u32,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

impl Pos {
    fn of(m: Marker) -> Pos {
        Pos {
            line: m.line() as u32,
            col: m.col() as u32 + 1,
        }
    }
}

/// One YAML node.
#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub pos: Pos,
    pub kind: Kind,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Kind {
    /// A scalar; `quoted` scalars are always strings.
    Scalar {
        text: String,
        quoted: bool,
    },
    Seq(Vec<Node>),
    /// Keys in source order.
    Map(Vec<(Node, Node)>),
}

impl Node {
    /// What kind of node this is, for messages.
    pub fn describe(&self) -> &'static str {
        match &self.kind {
            Kind::Scalar { .. } => match self.to_json() {
                Value::Null => "null",
                Value::Bool(_) => "a boolean",
                Value::Number(_) => "a number",
                _ => "a string",
            },
            Kind::Seq(_) => "a list",
            Kind::Map(_) => "a mapping",
        }
    }

    /// The scalar's text, if this is a scalar.
    pub fn as_scalar(&self) -> Option<&str> {
        match &self.kind {
            Kind::Scalar { text, .. } => Some(text),
            _ => None,
        }
    }

    /// The node as JSON, with YAML 1.2 core-schema typing of plain scalars.
    pub fn to_json(&self) -> Value {
        match &self.kind {
            Kind::Scalar { text, quoted: true } => Value::String(text.clone()),
            Kind::Scalar {
                text,
                quoted: false,
            } => plain_scalar(text),
            Kind::Seq(items) => Value::Array(items.iter().map(Node::to_json).collect()),
            Kind::Map(pairs) => Value::Object(
                pairs
                    .iter()
                    .map(|(k, v)| {
                        let key = match &k.kind {
                            Kind::Scalar { text, .. } => text.clone(),
                            _ => k.to_json().to_string(),
                        };
                        (key, v.to_json())
                    })
                    .collect(),
            ),
        }
    }
}

fn plain_scalar(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    let looks_numeric = text
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '+' || c == '.');
    if looks_numeric {
        if let Ok(i) = text.parse::<i64>() {
            return Value::from(i);
        }
        if let Ok(f) = text.parse::<f64>()
            && f.is_finite()
            && let Some(n) = serde_json::Number::from_f64(f)
        {
            return Value::Number(n);
        }
    }
    Value::String(text.to_owned())
}

/// A YAML syntax error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub pos: Pos,
    pub message: String,
}

enum Frame {
    Seq(Pos, usize, Vec<Node>),
    Map(Pos, usize, Vec<(Node, Node)>, Option<Node>),
}

/// Most nodes a document may expand to (aliases included): a small file cannot make a huge tree.
const MAX_NODES: usize = 200_000;
/// Deepest nesting of lists and mappings.
const MAX_NESTING: usize = 128;

fn count(node: &Node) -> usize {
    match &node.kind {
        Kind::Scalar { .. } => 1,
        Kind::Seq(items) => 1 + items.iter().map(count).sum::<usize>(),
        Kind::Map(pairs) => {
            1 + pairs
                .iter()
                .map(|(k, v)| count(k) + count(v))
                .sum::<usize>()
        }
    }
}

#[derive(Default)]
struct Builder {
    nodes: usize,
    stack: Vec<Frame>,
    root: Option<Node>,
    anchors: HashMap<usize, Node>,
    error: Option<SyntaxError>,
    documents: usize,
}

impl Builder {
    fn push(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => {
                if self.root.is_none() {
                    self.root = Some(node);
                }
            }
            Some(Frame::Seq(_, _, items)) => items.push(node),
            Some(Frame::Map(pos, _, pairs, key)) => match key.take() {
                None => {
                    // The first key of a block mapping is where the mapping starts, as a reader sees it.
                    if pairs.is_empty() && node.pos < *pos {
                        *pos = node.pos;
                    }
                    if let Some(dup) = pairs.iter().find(|(k, _)| k.kind == node.kind)
                        && self.error.is_none()
                    {
                        self.error = Some(SyntaxError {
                            pos: node.pos,
                            message: format!(
                                "duplicate key {} (first at {})",
                                node.as_scalar().unwrap_or("?"),
                                dup.0.pos
                            ),
                        });
                    }
                    *key = Some(node);
                }
                Some(k) => pairs.push((k, node)),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos::of(mark);
        if self.error.is_some() {
            return;
        }
        if self.nodes > MAX_NODES {
            self.error = Some(SyntaxError {
                pos,
                message: format!(
                    "the document expands to more than {MAX_NODES} nodes (through aliases?)"
                ),
            });
            return;
        }
        if matches!(ev, Event::SequenceStart(..) | Event::MappingStart(..))
            && self.stack.len() >= MAX_NESTING
        {
            self.error = Some(SyntaxError {
                pos,
                message: format!("lists and mappings nest more than {MAX_NESTING} deep"),
            });
            return;
        }
        self.nodes += 1;
        match ev {
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 && self.error.is_none() {
                    self.error = Some(SyntaxError {
                        pos,
                        message: "a workflow file holds one YAML document; found a second `---`"
                            .into(),
                    });
                }
            }
            Event::Scalar(text, style, anchor, _tag) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                self.push(
                    Node {
                        pos,
                        kind: Kind::Scalar { text, quoted },
                    },
                    anchor,
                );
            }
            Event::SequenceStart(anchor, _) => self.stack.push(Frame::Seq(pos, anchor, Vec::new())),
            Event::MappingStart(anchor, _) => {
                self.stack.push(Frame::Map(pos, anchor, Vec::new(), None))
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (node, anchor) = match self.stack.pop() {
                    Some(Frame::Seq(pos, anchor, items)) => (
                        Node {
                            pos,
                            kind: Kind::Seq(items),
                        },
                        anchor,
                    ),
                    Some(Frame::Map(pos, anchor, pairs, _)) => (
                        Node {
                            pos,
                            kind: Kind::Map(pairs),
                        },
                        anchor,
                    ),
                    None => return,
                };
                self.push(node, anchor);
            }
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(mut node) => {
                    self.nodes += count(&node);
                    if self.nodes > MAX_NODES {
                        return;
                    }
                    node.pos = pos;
                    self.push(node, 0);
                }
                None => {
                    if self.error.is_none() {
                        self.error = Some(SyntaxError {
                            pos,
                            message: "an alias names an anchor that is not defined before it"
                                .into(),
                        });
                    }
                }
            },
            Event::Nothing | Event::StreamStart | Event::StreamEnd | Event::DocumentEnd => {}
        }
    }
}

/// Parses one YAML document. An empty document is an empty mapping.
pub fn parse(source: &str) -> Result<Node, SyntaxError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(source);
    if let Err(e) = parser.load(&mut builder, true) {
        return Err(SyntaxError {
            pos: Pos::of(*e.marker()),
            message: e.info().to_owned(),
        });
    }
    if let Some(e) = builder.error {
        return Err(e);
    }
    Ok(builder.root.unwrap_or(Node {
        pos: Pos { line: 1, col: 1 },
        kind: Kind::Map(Vec::new()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based() {
        let n = parse("name: x\nsteps:\n  - id: a\n    run: echo\n").unwrap();
        let Kind::Map(pairs) = &n.kind else { panic!() };
        assert_eq!(pairs[1].0.pos, Pos { line: 2, col: 1 });
        let Kind::Seq(steps) = &pairs[1].1.kind else {
            panic!()
        };
        assert_eq!(steps[0].pos, Pos { line: 3, col: 5 });
    }

    #[test]
    fn typing_and_aliases() {
        let n = parse("a: &x [1, '2', true, null, 1.5, hi]\nb: *x\n").unwrap();
        let v = n.to_json();
        assert_eq!(v["a"], serde_json::json!([1, "2", true, null, 1.5, "hi"]));
        assert_eq!(v["a"], v["b"]);
    }

    #[test]
    fn alias_bombs_and_deep_nesting_are_errors() {
        let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
        for i in 1..12 {
            bomb.push_str(&format!("a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n", p = i - 1));
        }
        let e = parse(&bomb).unwrap_err();
        assert!(
            e.message.contains("more than 200000 nodes"),
            "{}",
            e.message
        );
        let deep = format!("{}x{}", "[".repeat(10_000), "]".repeat(10_000));
        let e = parse(&deep).unwrap_err();
        // yaml-rust2 stops even earlier, with its own recursion limit; either way it is an error, not a crash.
        assert!(
            e.message.contains("nest more than 128") || e.message.contains("recursion limit"),
            "{}",
            e.message
        );
        let deep = format!("{}x{}", "[".repeat(200), "]".repeat(200));
        assert!(parse(&deep).is_err());
    }

    #[test]
    fn syntax_errors_and_duplicates() {
        let e = parse("a: [b\nc: d").unwrap_err();
        assert_eq!(e.pos.line, 2);
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(e.pos, Pos { line: 3, col: 1 });
        assert!(
            e.message.contains("duplicate key a (first at 1:1)"),
            "{}",
            e.message
        );
    }
}
