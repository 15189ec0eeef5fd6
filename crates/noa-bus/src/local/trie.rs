//! The subscription trie: one node per subject token, with `*` and `>` branches.

use crate::{Pattern, Sink, SubId};
use smallvec::SmallVec;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub(super) struct Entry {
    pub sid: SubId,
    pub sink: Sink,
}

#[derive(Debug)]
struct QueueGroup {
    name: Arc<str>,
    members: Vec<Arc<Entry>>,
    next: AtomicUsize,
}

/// The subscriptions that end at one point of the trie.
#[derive(Debug, Default)]
struct Level {
    plain: Vec<Arc<Entry>>,
    queues: Vec<QueueGroup>,
}

impl Level {
    fn is_empty(&self) -> bool {
        self.plain.is_empty() && self.queues.is_empty()
    }

    fn remove(&mut self, sid: SubId, queue: Option<&str>) -> bool {
        match queue {
            None => {
                let before = self.plain.len();
                self.plain.retain(|e| e.sid != sid);
                before != self.plain.len()
            }
            Some(q) => {
                let Some(gi) = self.queues.iter().position(|g| &*g.name == q) else {
                    return false;
                };
                let group = &mut self.queues[gi];
                let before = group.members.len();
                group.members.retain(|e| e.sid != sid);
                let removed = before != group.members.len();
                if group.members.is_empty() {
                    self.queues.remove(gi);
                }
                removed
            }
        }
    }
}

#[derive(Debug, Default)]
struct Node {
    literal: HashMap<Box<str>, Node>,
    star: Option<Box<Node>>,
    /// Subscriptions whose pattern ends here.
    here: Level,
    /// Subscriptions whose pattern ends with `>` here.
    rest: Level,
}

impl Node {
    fn is_empty(&self) -> bool {
        self.literal.is_empty()
            && self.star.is_none()
            && self.here.is_empty()
            && self.rest.is_empty()
    }
}

/// The levels that match one subject.
#[derive(Default)]
pub(super) struct Matches<'a> {
    levels: SmallVec<[&'a Level; 8]>,
}

impl<'a> Matches<'a> {
    pub fn plain(&self) -> impl Iterator<Item = &'a Entry> + '_ {
        self.levels
            .iter()
            .flat_map(|l| l.plain.iter().map(|e| &**e))
    }

    /// Calls `f(members, start)` once per queue group matched, with every member of that group across
    /// all matching patterns and the rotating index of the member to try first.
    pub fn for_each_queue_group(&self, mut f: impl FnMut(&[&'a Entry], usize)) {
        let mut with_queues = self
            .levels
            .iter()
            .filter(|l| !l.queues.is_empty())
            .peekable();
        let Some(first) = with_queues.next() else {
            return;
        };
        if with_queues.peek().is_none() {
            for g in &first.queues {
                let members: SmallVec<[&Entry; 8]> = g.members.iter().map(|e| &**e).collect();
                f(&members, g.next.fetch_add(1, Ordering::Relaxed));
            }
            return;
        }
        // Several patterns matched with queue groups: a group name counts once across all of them.
        let levels: SmallVec<[&Level; 8]> = self
            .levels
            .iter()
            .copied()
            .filter(|l| !l.queues.is_empty())
            .collect();
        let mut seen: SmallVec<[&str; 8]> = SmallVec::new();
        for (i, level) in levels.iter().enumerate() {
            for g in &level.queues {
                if seen.contains(&&*g.name) {
                    continue;
                }
                seen.push(&g.name);
                let mut members: SmallVec<[&Entry; 8]> = g.members.iter().map(|e| &**e).collect();
                for later in &levels[i + 1..] {
                    if let Some(g2) = later.queues.iter().find(|x| x.name == g.name) {
                        members.extend(g2.members.iter().map(|e| &**e));
                    }
                }
                f(&members, g.next.fetch_add(1, Ordering::Relaxed));
            }
        }
    }
}

/// All subscriptions of a local bus.
#[derive(Debug, Default)]
pub(super) struct Trie {
    root: Node,
    index: HashMap<SubId, (Pattern, Option<Arc<str>>)>,
}

impl Trie {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn insert(&mut self, sid: SubId, pattern: Pattern, queue: Option<Arc<str>>, sink: Sink) {
        let mut node = &mut self.root;
        let mut level = None;
        let tokens: Vec<&str> = pattern.tokens().collect();
        for (i, tok) in tokens.iter().enumerate() {
            match *tok {
                ">" => {
                    debug_assert_eq!(i, tokens.len() - 1);
                    level = Some(&mut node.rest);
                    break;
                }
                "*" => node = node.star.get_or_insert_with(Box::default),
                lit => node = node.literal.entry(Box::from(lit)).or_default(),
            }
        }
        let level = match level {
            Some(l) => l,
            None => &mut node.here,
        };
        let entry = Arc::new(Entry { sid, sink });
        match &queue {
            None => level.plain.push(entry),
            Some(q) => match level.queues.iter_mut().find(|g| g.name == *q) {
                Some(g) => g.members.push(entry),
                None => level.queues.push(QueueGroup {
                    name: q.clone(),
                    members: vec![entry],
                    next: AtomicUsize::new(0),
                }),
            },
        }
        self.index.insert(sid, (pattern, queue));
    }

    pub fn remove(&mut self, sid: SubId) -> bool {
        let Some((pattern, queue)) = self.index.remove(&sid) else {
            return false;
        };
        let tokens: Vec<&str> = pattern.tokens().collect();
        remove_at(&mut self.root, &tokens, sid, queue.as_deref())
    }

    pub fn collect<'a>(&'a self, subject: &str, out: &mut Matches<'a>) {
        walk(&self.root, Some(subject), out);
    }
}

fn walk<'a>(node: &'a Node, rest: Option<&str>, out: &mut Matches<'a>) {
    let Some(rest) = rest else {
        if !node.here.is_empty() {
            out.levels.push(&node.here);
        }
        return;
    };
    if !node.rest.is_empty() {
        out.levels.push(&node.rest);
    }
    let (token, tail) = match rest.split_once('.') {
        Some((t, tail)) => (t, Some(tail)),
        None => (rest, None),
    };
    if let Some(child) = node.literal.get(token) {
        walk(child, tail, out);
    }
    if let Some(star) = &node.star {
        walk(star, tail, out);
    }
}

/// Removes `sid` below `node`, pruning nodes left empty. Returns whether it was found.
fn remove_at(node: &mut Node, tokens: &[&str], sid: SubId, queue: Option<&str>) -> bool {
    match tokens.split_first() {
        None => node.here.remove(sid, queue),
        Some((&">", _)) => node.rest.remove(sid, queue),
        Some((&"*", tail)) => {
            let Some(star) = node.star.as_mut() else {
                return false;
            };
            let found = remove_at(star, tail, sid, queue);
            if star.is_empty() {
                node.star = None;
            }
            found
        }
        Some((lit, tail)) => {
            let Some(child) = node.literal.get_mut(*lit) else {
                return false;
            };
            let found = remove_at(child, tail, sid, queue);
            if child.is_empty() {
                node.literal.remove(*lit);
            }
            found
        }
    }
}
