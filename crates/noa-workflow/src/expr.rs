//! `${{ }}` expressions: a small, total language over JSON values.
//!
//! Grammar (normative in `docs/specs/workflow.md` §4):
//! `expr := or; or := and ('||' and)*; and := cmp ('&&' cmp)*; cmp := unary (op unary)?`
//! with `op` one of `== != < <= > >=`; `unary := '!' unary | postfix`;
//! `postfix := primary ('.' name | '[' expr ']')*`; `primary := literal | name | name '(' args ')' | '(' expr ')'`.
//! Evaluation never panics: a missing field is `null`, a type mismatch in a comparison is `false`,
//! and only a function given the wrong arguments is an error.

use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;

/// An expression or template error, at a byte offset of the expression's text.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExprError {
    pub offset: usize,
    pub message: String,
}

impl fmt::Display for ExprError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    And,
    Or,
}

/// The functions an expression may call.
pub const FUNCTIONS: &[(&str, usize)] = &[
    ("contains", 2),
    ("startsWith", 2),
    ("endsWith", 2),
    ("toJSON", 1),
    ("fromJSON", 1),
    ("length", 1),
    ("join", 2),
    ("trim", 1),
    ("lower", 1),
    ("upper", 1),
];

#[derive(Clone, Debug, PartialEq)]
pub enum Expr {
    Lit(Value),
    Var(String),
    Field(Box<Expr>, String),
    Index(Box<Expr>, Box<Expr>),
    Not(Box<Expr>),
    Bin(Op, Box<Expr>, Box<Expr>),
    Call(String, Vec<Expr>),
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Num(f64),
    Str(String),
    Name(String),
    Sym(&'static str),
}

fn lex(src: &str) -> Result<Vec<(usize, Tok)>, ExprError> {
    let b = src.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        let start = i;
        if c == b'\'' || c == b'"' {
            // Quotes are doubled to escape them, as in GitHub Actions: 'it''s'.
            let q = c;
            let mut s = String::new();
            i += 1;
            loop {
                match src[i..].find(q as char) {
                    None => {
                        return Err(ExprError {
                            offset: start,
                            message: "a string is not closed".into(),
                        });
                    }
                    Some(j) => {
                        s.push_str(&src[i..i + j]);
                        i += j + 1;
                        if b.get(i) == Some(&q) {
                            s.push(q as char);
                            i += 1;
                        } else {
                            break;
                        }
                    }
                }
            }
            out.push((start, Tok::Str(s)));
        } else if c.is_ascii_digit() || (c == b'-' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            i += 1;
            while i < b.len() && (b[i].is_ascii_digit() || b[i] == b'.' || b[i] == b'e') {
                i += 1;
            }
            let text = &src[start..i];
            let n = text.parse::<f64>().map_err(|_| ExprError {
                offset: start,
                message: format!("{text:?} is not a number"),
            })?;
            out.push((start, Tok::Num(n)));
        } else if c.is_ascii_alphabetic() || c == b'_' {
            while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'-') {
                i += 1;
            }
            out.push((start, Tok::Name(src[start..i].to_owned())));
        } else {
            let two = src.get(i..i + 2).unwrap_or("");
            let sym = match two {
                "==" | "!=" | "<=" | ">=" | "&&" | "||" => Some(two),
                _ => None,
            };
            let sym: &'static str = match sym {
                Some("==") => "==",
                Some("!=") => "!=",
                Some("<=") => "<=",
                Some(">=") => ">=",
                Some("&&") => "&&",
                Some("||") => "||",
                _ => match c {
                    b'<' => "<",
                    b'>' => ">",
                    b'!' => "!",
                    b'.' => ".",
                    b',' => ",",
                    b'(' => "(",
                    b')' => ")",
                    b'[' => "[",
                    b']' => "]",
                    _ => {
                        let ch = src[i..].chars().next().unwrap_or('?');
                        return Err(ExprError {
                            offset: i,
                            message: format!("unexpected character {ch:?}"),
                        });
                    }
                },
            };
            i += sym.len();
            out.push((start, Tok::Sym(sym)));
        }
    }
    Ok(out)
}

struct P<'a> {
    toks: &'a [(usize, Tok)],
    i: usize,
    end: usize,
    /// How deeply the parser has recursed: bounded, so no expression can exhaust the stack.
    depth: usize,
}

/// The deepest nesting of parentheses, `!`, indexes and calls an expression may have.
const MAX_DEPTH: usize = 64;

impl P<'_> {
    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.i).map(|t| &t.1)
    }
    fn offset(&self) -> usize {
        self.toks.get(self.i).map(|t| t.0).unwrap_or(self.end)
    }
    fn eat(&mut self, sym: &str) -> bool {
        if matches!(self.peek(), Some(Tok::Sym(s)) if *s == sym) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn err<T>(&self, message: impl Into<String>) -> Result<T, ExprError> {
        Err(ExprError {
            offset: self.offset(),
            message: message.into(),
        })
    }
    fn expect(&mut self, sym: &str) -> Result<(), ExprError> {
        if self.eat(sym) {
            Ok(())
        } else {
            self.err(format!("expected `{sym}`"))
        }
    }
    fn or(&mut self) -> Result<Expr, ExprError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.err(format!("the expression nests more than {MAX_DEPTH} deep"));
        }
        let r = self.or_inner();
        self.depth -= 1;
        r
    }
    fn or_inner(&mut self) -> Result<Expr, ExprError> {
        let mut l = self.and()?;
        while self.eat("||") {
            l = Expr::Bin(Op::Or, Box::new(l), Box::new(self.and()?));
        }
        Ok(l)
    }
    fn and(&mut self) -> Result<Expr, ExprError> {
        let mut l = self.cmp()?;
        while self.eat("&&") {
            l = Expr::Bin(Op::And, Box::new(l), Box::new(self.cmp()?));
        }
        Ok(l)
    }
    fn cmp(&mut self) -> Result<Expr, ExprError> {
        let l = self.unary()?;
        let op = match self.peek() {
            Some(Tok::Sym("==")) => Op::Eq,
            Some(Tok::Sym("!=")) => Op::Ne,
            Some(Tok::Sym("<")) => Op::Lt,
            Some(Tok::Sym("<=")) => Op::Le,
            Some(Tok::Sym(">")) => Op::Gt,
            Some(Tok::Sym(">=")) => Op::Ge,
            _ => return Ok(l),
        };
        self.i += 1;
        Ok(Expr::Bin(op, Box::new(l), Box::new(self.unary()?)))
    }
    fn unary(&mut self) -> Result<Expr, ExprError> {
        if self.eat("!") {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return self.err(format!("the expression nests more than {MAX_DEPTH} deep"));
            }
            let inner = self.unary();
            self.depth -= 1;
            return Ok(Expr::Not(Box::new(inner?)));
        }
        let mut e = self.primary()?;
        loop {
            if self.eat(".") {
                match self.peek().cloned() {
                    Some(Tok::Name(n)) => {
                        self.i += 1;
                        e = Expr::Field(Box::new(e), n);
                    }
                    Some(Tok::Num(n)) if n.fract() == 0.0 && n >= 0.0 => {
                        self.i += 1;
                        e = Expr::Index(Box::new(e), Box::new(Expr::Lit(Value::from(n as u64))));
                    }
                    _ => return self.err("expected a name after `.`"),
                }
            } else if self.eat("[") {
                let idx = self.or()?;
                self.expect("]")?;
                e = Expr::Index(Box::new(e), Box::new(idx));
            } else {
                return Ok(e);
            }
        }
    }
    fn primary(&mut self) -> Result<Expr, ExprError> {
        let Some(tok) = self.peek().cloned() else {
            return self.err("the expression ends too early");
        };
        let at = self.offset();
        self.i += 1;
        match tok {
            Tok::Num(n) => Ok(Expr::Lit(
                serde_json::Number::from_f64(n)
                    .map(|x| {
                        if n.fract() == 0.0 && n.abs() < 9e15 {
                            Value::from(n as i64)
                        } else {
                            Value::Number(x)
                        }
                    })
                    .unwrap_or(Value::Null),
            )),
            Tok::Str(s) => Ok(Expr::Lit(Value::String(s))),
            Tok::Name(n) => match n.as_str() {
                "true" => Ok(Expr::Lit(Value::Bool(true))),
                "false" => Ok(Expr::Lit(Value::Bool(false))),
                "null" => Ok(Expr::Lit(Value::Null)),
                _ if self.eat("(") => {
                    let Some((_, arity)) = FUNCTIONS.iter().find(|(f, _)| *f == n) else {
                        let names: Vec<&str> = FUNCTIONS.iter().map(|f| f.0).collect();
                        return Err(ExprError {
                            offset: at,
                            message: format!(
                                "unknown function `{n}`; the functions are {}",
                                names.join(", ")
                            ),
                        });
                    };
                    let mut args = Vec::new();
                    if !self.eat(")") {
                        loop {
                            args.push(self.or()?);
                            if self.eat(")") {
                                break;
                            }
                            self.expect(",")?;
                        }
                    }
                    if args.len() != *arity {
                        return Err(ExprError {
                            offset: at,
                            message: format!(
                                "`{n}` takes {arity} argument{}, not {}",
                                if *arity == 1 { "" } else { "s" },
                                args.len()
                            ),
                        });
                    }
                    Ok(Expr::Call(n, args))
                }
                _ => Ok(Expr::Var(n)),
            },
            Tok::Sym("(") => {
                let e = self.or()?;
                self.expect(")")?;
                Ok(e)
            }
            Tok::Sym(s) => Err(ExprError {
                offset: at,
                message: format!("unexpected `{s}`"),
            }),
        }
    }
}

impl Expr {
    /// Parses the text between `${{` and `}}`.
    pub fn parse(src: &str) -> Result<Expr, ExprError> {
        let toks = lex(src)?;
        if toks.is_empty() {
            return Err(ExprError {
                offset: 0,
                message: "the expression is empty".into(),
            });
        }
        let mut p = P {
            toks: &toks,
            i: 0,
            end: src.len(),
            depth: 0,
        };
        let e = p.or()?;
        if p.i < toks.len() {
            return p.err("unexpected text after the expression");
        }
        Ok(e)
    }

    /// Every variable path the expression reads, as `root` or `root.name` (for `steps.<id>`), in order.
    pub fn refs(&self, out: &mut Vec<(String, Option<String>)>) {
        match self {
            Expr::Lit(_) => {}
            Expr::Var(v) => out.push((v.clone(), None)),
            Expr::Field(inner, name) => {
                if let Expr::Var(v) = &**inner {
                    out.push((v.clone(), Some(name.clone())));
                } else {
                    inner.refs(out);
                }
            }
            Expr::Index(a, b) => {
                if let (Expr::Var(v), Expr::Lit(Value::String(s))) = (&**a, &**b) {
                    out.push((v.clone(), Some(s.clone())));
                } else {
                    a.refs(out);
                }
                b.refs(out);
            }
            Expr::Not(e) => e.refs(out),
            Expr::Bin(_, a, b) => {
                a.refs(out);
                b.refs(out);
            }
            Expr::Call(_, args) => args.iter().for_each(|a| a.refs(out)),
        }
    }

    /// Evaluates against `scope` (root name → value).
    pub fn eval(&self, scope: &Scope) -> Result<Value, String> {
        Ok(match self {
            Expr::Lit(v) => v.clone(),
            Expr::Var(v) => scope.vars.get(v).cloned().unwrap_or(Value::Null),
            Expr::Field(e, name) => match e.eval(scope)? {
                Value::Object(mut m) => m.remove(name).unwrap_or(Value::Null),
                _ => Value::Null,
            },
            Expr::Index(e, i) => {
                let base = e.eval(scope)?;
                match (base, i.eval(scope)?) {
                    (Value::Array(mut a), Value::Number(n)) => match n.as_u64() {
                        Some(i) if (i as usize) < a.len() => a.swap_remove(i as usize),
                        _ => Value::Null,
                    },
                    (Value::Object(mut m), Value::String(k)) => m.remove(&k).unwrap_or(Value::Null),
                    _ => Value::Null,
                }
            }
            Expr::Not(e) => Value::Bool(!truthy(&e.eval(scope)?)),
            Expr::Bin(Op::And, a, b) => {
                let l = a.eval(scope)?;
                if !truthy(&l) { l } else { b.eval(scope)? }
            }
            Expr::Bin(Op::Or, a, b) => {
                let l = a.eval(scope)?;
                if truthy(&l) { l } else { b.eval(scope)? }
            }
            Expr::Bin(op, a, b) => Value::Bool(compare(*op, &a.eval(scope)?, &b.eval(scope)?)),
            Expr::Call(f, args) => {
                let args = args
                    .iter()
                    .map(|a| a.eval(scope))
                    .collect::<Result<Vec<_>, _>>()?;
                call(f, args)?
            }
        })
    }
}

/// Whether a value counts as true: `false`, `null`, `0`, `""` are false; everything else is true.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => !s.is_empty(),
        Value::Array(_) | Value::Object(_) => true,
    }
}

/// A value as text: strings as they are, everything else as JSON.
pub fn to_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn compare(op: Op, a: &Value, b: &Value) -> bool {
    use std::cmp::Ordering;
    let ord = match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64().partial_cmp(&y.as_f64()),
        (Value::String(x), Value::String(y)) => Some(x.cmp(y)),
        // A number compared with text that holds a number compares as numbers: outputs are text.
        (Value::Number(x), Value::String(y)) => y
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|y| x.as_f64().partial_cmp(&Some(y))),
        (Value::String(x), Value::Number(y)) => x
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|x| Some(x).partial_cmp(&y.as_f64())),
        _ => {
            if a == b {
                Some(Ordering::Equal)
            } else {
                None
            }
        }
    };
    match op {
        Op::Eq => ord == Some(Ordering::Equal),
        Op::Ne => ord != Some(Ordering::Equal),
        Op::Lt => ord == Some(Ordering::Less),
        Op::Le => matches!(ord, Some(Ordering::Less | Ordering::Equal)),
        Op::Gt => ord == Some(Ordering::Greater),
        Op::Ge => matches!(ord, Some(Ordering::Greater | Ordering::Equal)),
        Op::And | Op::Or => false,
    }
}

fn call(f: &str, mut args: Vec<Value>) -> Result<Value, String> {
    let text = |v: &Value| to_text(v);
    Ok(match f {
        "contains" => match (&args[0], &args[1]) {
            (Value::Array(a), needle) => Value::Bool(a.contains(needle)),
            (hay, needle) => Value::Bool(text(hay).contains(&text(needle))),
        },
        "startsWith" => Value::Bool(text(&args[0]).starts_with(&text(&args[1]))),
        "endsWith" => Value::Bool(text(&args[0]).ends_with(&text(&args[1]))),
        "toJSON" => Value::String(args[0].to_string()),
        "fromJSON" => {
            let s = text(&args[0]);
            serde_json::from_str(&s).map_err(|e| {
                let shown: String = s.chars().take(40).collect();
                format!("fromJSON: {shown:?} is not JSON: {e}")
            })?
        }
        "length" => Value::from(match &args[0] {
            Value::Array(a) => a.len(),
            Value::Object(o) => o.len(),
            Value::Null => 0,
            v => text(v).chars().count(),
        }),
        "join" => match args.swap_remove(0) {
            Value::Array(a) => Value::String(
                a.iter()
                    .map(to_text)
                    .collect::<Vec<_>>()
                    .join(&text(&args[0])),
            ),
            v => Value::String(text(&v)),
        },
        "trim" => Value::String(text(&args[0]).trim().to_owned()),
        "lower" => Value::String(text(&args[0]).to_lowercase()),
        "upper" => Value::String(text(&args[0]).to_uppercase()),
        other => return Err(format!("unknown function `{other}`")),
    })
}

/// The variables an expression sees: `inputs`, `steps`, `env`, `item`, `output`, `iteration`, `run`.
#[derive(Clone, Debug, Default)]
pub struct Scope {
    pub vars: BTreeMap<String, Value>,
}

impl Scope {
    pub fn set(&mut self, name: &str, v: Value) {
        self.vars.insert(name.to_owned(), v);
    }
}

/// A string with `${{ }}` parts.
#[derive(Clone, Debug, PartialEq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq)]
enum Part {
    Text(String),
    Expr(Expr),
}

impl Template {
    /// Parses `src`; errors carry the byte offset in `src`.
    pub fn parse(src: &str) -> Result<Template, ExprError> {
        let mut parts = Vec::new();
        let mut rest = src;
        let mut base = 0;
        while let Some(start) = rest.find("${{") {
            if start > 0 {
                parts.push(Part::Text(rest[..start].to_owned()));
            }
            let body_at = start + 3;
            let Some(len) = rest[body_at..].find("}}") else {
                return Err(ExprError {
                    offset: base + start,
                    message: "`${{` is not closed by `}}`".into(),
                });
            };
            let body = &rest[body_at..body_at + len];
            let e = Expr::parse(body).map_err(|e| ExprError {
                offset: base + body_at + e.offset,
                message: e.message,
            })?;
            parts.push(Part::Expr(e));
            base += body_at + len + 2;
            rest = &rest[body_at + len + 2..];
        }
        if !rest.is_empty() {
            parts.push(Part::Text(rest.to_owned()));
        }
        Ok(Template { parts })
    }

    /// A template of plain text.
    pub fn text(s: &str) -> Template {
        Template {
            parts: vec![Part::Text(s.to_owned())],
        }
    }

    /// Whether the template has no `${{ }}`.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Text(_)))
    }

    /// Every expression in the template.
    pub fn exprs(&self) -> impl Iterator<Item = &Expr> {
        self.parts.iter().filter_map(|p| match p {
            Part::Expr(e) => Some(e),
            Part::Text(_) => None,
        })
    }

    /// The template as text, each expression's value converted with [`to_text`].
    pub fn render(&self, scope: &Scope) -> Result<String, String> {
        let mut s = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => s.push_str(t),
                Part::Expr(e) => s.push_str(&to_text(&e.eval(scope)?)),
            }
        }
        Ok(s)
    }

    /// The template as a value: a template that is one expression keeps the expression's type.
    pub fn value(&self, scope: &Scope) -> Result<Value, String> {
        match self.parts.as_slice() {
            [Part::Expr(e)] => e.eval(scope),
            _ => self.render(scope).map(Value::String),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn scope() -> Scope {
        let mut s = Scope::default();
        s.set("inputs", json!({"topic": "rust", "n": 3}));
        s.set(
            "steps",
            json!({"a": {"status": "succeeded", "output": "42\n", "outputs": {"k": "v"}}}),
        );
        s.set("item", json!("x"));
        s
    }

    fn eval(src: &str) -> Value {
        Expr::parse(src).unwrap().eval(&scope()).unwrap()
    }

    #[test]
    fn evaluates() {
        assert_eq!(eval("inputs.topic"), json!("rust"));
        assert_eq!(eval("steps.a.status == 'succeeded'"), json!(true));
        assert_eq!(eval("steps.a.outputs.k"), json!("v"));
        assert_eq!(eval("steps['a'].outputs['k']"), json!("v"));
        assert_eq!(eval("steps.missing.output"), json!(null));
        assert_eq!(eval("inputs.n > 2 && !(inputs.n >= 4)"), json!(true));
        assert_eq!(eval("trim(steps.a.output) == 42"), json!(true));
        assert_eq!(eval("contains(fromJSON('[1,2]'), 2)"), json!(true));
        assert_eq!(eval("length('héllo')"), json!(5));
        assert_eq!(eval("join(fromJSON('[\"a\",1]'), '-')"), json!("a-1"));
        assert_eq!(eval("'it''s'"), json!("it's"));
        assert_eq!(eval("null || 'default'"), json!("default"));
        assert_eq!(eval("fromJSON('[5,6]')[1]"), json!(6));
    }

    #[test]
    fn errors_point_at_the_problem() {
        let e = Expr::parse("inputs.topic ==").unwrap_err();
        assert_eq!(
            (e.offset, e.message.as_str()),
            (15, "the expression ends too early")
        );
        let e = Expr::parse("nope(1)").unwrap_err();
        assert!(
            e.message.starts_with("unknown function `nope`"),
            "{}",
            e.message
        );
        let e = Expr::parse("length(1, 2)").unwrap_err();
        assert_eq!(e.message, "`length` takes 1 argument, not 2");
        let e = Expr::parse("'open").unwrap_err();
        assert_eq!(e.message, "a string is not closed");
        let e = Template::parse("a ${{ inputs.x").unwrap_err();
        assert_eq!(e.offset, 2);
        let e = Template::parse("ab ${{ 1 + 2 }}").unwrap_err();
        assert_eq!(
            (e.offset, e.message.as_str()),
            (9, "unexpected character '+'")
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = format!("{}x{}", "(".repeat(10_000), ")".repeat(10_000));
        assert!(
            Expr::parse(&deep)
                .unwrap_err()
                .message
                .contains("nests more than 64")
        );
        let nots = format!("{}x", "!".repeat(100_000));
        assert!(
            Expr::parse(&nots)
                .unwrap_err()
                .message
                .contains("nests more than 64")
        );
        let index = format!("x{}", "[x".repeat(10_000));
        assert!(Expr::parse(&index).is_err());
        assert!(Expr::parse(&format!("{}x{}", "(".repeat(60), ")".repeat(60))).is_ok());
    }

    #[test]
    fn templates() {
        let t = Template::parse("topic=${{ inputs.topic }} n=${{ inputs.n }}").unwrap();
        assert_eq!(t.render(&scope()).unwrap(), "topic=rust n=3");
        let t = Template::parse("${{ inputs.n }}").unwrap();
        assert_eq!(t.value(&scope()).unwrap(), json!(3));
        assert!(Template::parse("plain").unwrap().is_literal());
        let mut refs = Vec::new();
        Expr::parse("steps.a.output == inputs.topic || item")
            .unwrap()
            .refs(&mut refs);
        assert_eq!(
            refs,
            vec![
                ("steps".into(), Some("a".into())),
                ("inputs".into(), Some("topic".into())),
                ("item".into(), None)
            ]
        );
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in "\\PC{0,40}") {
            let _ = Template::parse(&s);
            if let Ok(e) = Expr::parse(&s) {
                let _ = e.eval(&scope());
            }
        }

        #[test]
        fn parsing_never_panics_on_expression_like_text(s in "[a-z.()\\[\\]'\" =!<>&|,0-9-]{0,30}") {
            if let Ok(e) = Expr::parse(&s) {
                let _ = e.eval(&scope());
            }
        }
    }
}
