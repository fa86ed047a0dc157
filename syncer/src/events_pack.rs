//! Sale events packed into Kafka messages: the relay sends the events of one outbox read as a
//! few messages, each holding up to [`PACK_EVENTS_MAX`] events one per line, instead of one
//! message per event. A Kafka-compatible broker pays mostly per message (Tansu stores each
//! record as a row: about 22 µs of CPU to store one and 41 µs to fetch it on this machine),
//! so a pack costs it about what one event did, and the pipeline stops being bound by it.
//!
//! The format: a packed message carries the header [`HEADER`] (its event count, decimal) and
//! its events' JSON texts joined by `\n`, each exactly as the deduct script wrote it. A message
//! without the header is one event, as the relay wrote every message before packs, so the
//! writer reads a topic holding both. JSON texts from `cjson` and `serde_json` never hold a raw
//! newline; an outbox entry that does is sent alone, unpacked, so its bytes stay one event
//! (and one dead letter if it is junk). The writer decodes each line on its own: a line it
//! cannot read is dead-lettered alone, the rest of its pack is applied.

use std::ops::Range;

/// The header that marks a packed message, valued with its event count.
pub const HEADER: &str = "events";
/// Events one message carries at most.
pub const PACK_EVENTS_MAX: usize = 128;
/// A pack's payload stays under this, far below the 1 MB a Kafka message may hold by default.
pub const PACK_BYTES_MAX: usize = 256 * 1024;

/// One Kafka message the relay sends for a read batch, by index into the batch's entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pack {
    /// One entry alone: an event that cannot be packed, or an entry without an event (a dead
    /// letter).
    Single(usize),
    /// Consecutive events, one per line.
    Lines(Range<usize>),
}

impl Pack {
    /// The entries this message carries.
    pub fn entries(&self) -> Range<usize> {
        match self {
            Pack::Single(i) => *i..*i + 1,
            Pack::Lines(range) => range.clone(),
        }
    }
}

/// Splits a read batch into messages, in order. `events[i]` is entry `i`'s event text, or
/// `None` for an entry without one. Consecutive packable events share a message up to
/// [`PACK_EVENTS_MAX`] events and [`PACK_BYTES_MAX`] bytes; a pack of one is sent `Single`.
pub fn plan(events: &[Option<&[u8]>]) -> Vec<Pack> {
    let mut packs = Vec::new();
    let mut open: Option<(usize, usize)> = None; // (first entry, payload bytes so far)
    let close = |packs: &mut Vec<Pack>, open: &mut Option<(usize, usize)>, end: usize| {
        if let Some((start, _)) = open.take() {
            packs.push(if end - start == 1 {
                Pack::Single(start)
            } else {
                Pack::Lines(start..end)
            });
        }
    };
    for (i, event) in events.iter().enumerate() {
        match event {
            Some(bytes) if packable(bytes) => {
                let added = bytes.len() + 1;
                if let Some((start, size)) = open {
                    if i - start == PACK_EVENTS_MAX || size + added > PACK_BYTES_MAX {
                        close(&mut packs, &mut open, i);
                    }
                }
                let (_, size) = open.get_or_insert((i, 0));
                *size += added;
            }
            _ => {
                close(&mut packs, &mut open, i);
                packs.push(Pack::Single(i));
            }
        }
    }
    close(&mut packs, &mut open, events.len());
    packs
}

/// Whether an event may share a message: no raw newline, and small enough.
fn packable(event: &[u8]) -> bool {
    event.len() < PACK_BYTES_MAX && !event.contains(&b'\n')
}

/// A pack's payload: the events joined by `\n`.
pub fn join<'a>(events: impl Iterator<Item = &'a [u8]> + Clone) -> Vec<u8> {
    let size = events.clone().map(|e| e.len() + 1).sum();
    let mut payload = Vec::with_capacity(size);
    for (i, event) in events.enumerate() {
        if i > 0 {
            payload.push(b'\n');
        }
        payload.extend_from_slice(event);
    }
    payload
}

/// The events a message holds as its header says: for sizing the writer's batches only (the
/// lines are what is applied). No header, or one that does not read, counts as one; the
/// count is bounded by [`PACK_EVENTS_MAX`].
pub fn count(header: Option<&[u8]>) -> usize {
    header
        .and_then(|value| std::str::from_utf8(value).ok())
        .and_then(|value| value.parse::<usize>().ok())
        .map_or(1, |n| n.clamp(1, PACK_EVENTS_MAX))
}

/// A message's events: each with its line number when the message is a pack (`packed`: it
/// carries [`HEADER`]), the whole payload as one event otherwise.
pub fn split(payload: &[u8], packed: bool) -> Vec<(Option<usize>, &[u8])> {
    if packed {
        payload
            .split(|b| *b == b'\n')
            .enumerate()
            .map(|(line, event)| (Some(line), event))
            .collect()
    } else {
        vec![(None, payload)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(texts: &[Option<&'static str>]) -> Vec<Option<&'static [u8]>> {
        texts.iter().map(|t| t.map(str::as_bytes)).collect()
    }

    #[test]
    fn consecutive_events_share_a_message_and_junk_travels_alone() {
        let batch = events(&[
            Some(r#"{"a":1}"#),
            Some(r#"{"a":2}"#),
            None,
            Some("{\n}"),
            Some(r#"{"a":3}"#),
            Some(r#"{"a":4}"#),
            Some(r#"{"a":5}"#),
            Some(r#"{"a":6}"#),
        ]);
        assert_eq!(
            plan(&batch),
            vec![
                Pack::Lines(0..2),
                Pack::Single(2),
                Pack::Single(3),
                Pack::Lines(4..8)
            ]
        );
    }

    #[test]
    fn every_entry_is_in_exactly_one_message_in_order() {
        for n in [0, 1, 2, 127, 128, 129, 300, 512] {
            let batch: Vec<Option<&[u8]>> = (0..n)
                .map(|i| (i % 97 != 5).then_some(&b"{}"[..]))
                .collect();
            let covered: Vec<usize> = plan(&batch).iter().flat_map(Pack::entries).collect();
            assert_eq!(covered, (0..n).collect::<Vec<_>>(), "{n} entries");
            assert!(plan(&batch)
                .iter()
                .all(|p| p.entries().len() <= PACK_EVENTS_MAX));
        }
    }

    #[test]
    fn a_pack_stays_under_its_byte_bound() {
        let big = vec![b'x'; PACK_BYTES_MAX / 3];
        let batch: Vec<Option<&[u8]>> = (0..7).map(|_| Some(&big[..])).collect();
        let packs = plan(&batch);
        assert_eq!(
            packs,
            vec![
                Pack::Lines(0..2),
                Pack::Lines(2..4),
                Pack::Lines(4..6),
                Pack::Single(6)
            ]
        );
        let huge = vec![b'x'; PACK_BYTES_MAX];
        assert_eq!(
            plan(&[Some(&huge[..]), Some(b"{}")]),
            vec![Pack::Single(0), Pack::Single(1)]
        );
    }

    #[test]
    fn a_pack_splits_back_into_its_events() {
        let texts: Vec<&[u8]> = vec![br#"{"a":1}"#, b"", br#"{"b":2}"#];
        let payload = join(texts.iter().copied());
        assert_eq!(payload, b"{\"a\":1}\n\n{\"b\":2}");
        let back = split(&payload, true);
        assert_eq!(
            back,
            vec![
                (Some(0), texts[0]),
                (Some(1), texts[1]),
                (Some(2), texts[2])
            ]
        );
        // Without the header a message is one event, whatever it holds.
        assert_eq!(split(b"{\n}", false), vec![(None, &b"{\n}"[..])]);
    }

    #[test]
    fn a_header_that_does_not_read_counts_one() {
        assert_eq!(count(None), 1);
        assert_eq!(count(Some(b"17")), 17);
        assert_eq!(count(Some(b"0")), 1);
        assert_eq!(count(Some(b"-3")), 1);
        assert_eq!(count(Some(b"lots")), 1);
        assert_eq!(count(Some(b"99999999999999999999999")), 1);
        assert_eq!(count(Some(b"100000")), PACK_EVENTS_MAX);
    }
}
