//! The replication stream: `parse_frame` and `parse_message` on any bytes
//! never panic, and what they accept borrows only from the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgcache_core::pgoutput::{parse_frame, parse_message, Datum, Frame, Message};

fn inside(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    inner.is_empty() || (i >= o && i + inner.len() <= o + outer.len())
}

fn check_tuple(input: &[u8], tuple: &[Datum]) {
    // Every column costs at least one byte of the input.
    assert!(tuple.len() <= input.len());
    for d in tuple {
        if let Datum::Text(b) | Datum::Binary(b) = d {
            assert!(inside(input, b));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(Frame::XLogData { data: inner, .. }) = parse_frame(data) {
        assert!(inside(data, inner));
        let _ = parse_message(inner);
    }
    match parse_message(data) {
        Ok(Message::Insert { new, .. }) => check_tuple(data, &new),
        Ok(Message::Update { old, new, .. }) => {
            if let Some((_, old)) = old {
                check_tuple(data, &old);
            }
            check_tuple(data, &new);
        }
        Ok(Message::Delete { old: (_, old), .. }) => check_tuple(data, &old),
        Ok(Message::Truncate { oids, .. }) => assert!(oids.len() * 4 <= data.len()),
        Ok(Message::Relation { columns, .. }) => assert!(columns.len() <= data.len()),
        Ok(Message::Logical { content, .. }) => assert!(inside(data, content)),
        _ => {}
    }
});
