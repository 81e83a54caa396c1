//! The `tracing` feature's events, seen by a subscriber: pool created and
//! destroyed, the ring full, a map failure, a pool detached with pages in
//! flight, and unbind started and finished (with a warning for the
//! detached pool it had to unmap).
#![cfg(feature = "tracing")]

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use pagepool::checking::{CheckMode, CheckingDevice};
use pagepool::Device;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// Every event as `LEVEL target: message field=value ...`.
#[derive(Clone, Default)]
struct Collect(Arc<Mutex<Vec<String>>>);

struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl Subscriber for Collect {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, event: &Event<'_>) {
        let meta = event.metadata();
        let mut line = Line(format!("{} {}:", meta.level(), meta.target()));
        event.record(&mut line);
        self.0.lock().unwrap().push(line.0);
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

impl Collect {
    fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// The one line that contains every one of `parts`.
    #[track_caller]
    fn find(&self, parts: &[&str]) -> String {
        let lines = self.lines();
        let found: Vec<_> = lines
            .iter()
            .filter(|l| parts.iter().all(|p| l.contains(p)))
            .collect();
        assert_eq!(found.len(), 1, "{parts:?} in {lines:#?}");
        found[0].clone()
    }
}

#[test]
fn a_pools_life_and_an_unbind_are_traced() {
    let collect = Collect::default();
    let checker = CheckingDevice::new(CheckMode::Record);
    let device = Device::new(checker.clone());
    tracing::subscriber::with_default(collect.clone(), || {
        let mut pool = device
            .pool_builder()
            .label("eth0-rx")
            .queue(3)
            .cache_size(1)
            .refill_batch(1)
            .ring_size(1)
            .remote_batch(0)
            .build()
            .unwrap();
        let id = pool.id();
        let created = collect.find(&["page pool created"]);
        assert!(created.starts_with("DEBUG pagepool:"), "{created}");
        for part in [
            format!("pool={id}"),
            "label=\"eth0-rx\"".into(),
            "queue=3".into(),
        ] {
            assert!(created.contains(&part), "{part} in {created}");
        }
        // Three pages dropped into a ring of one: two find it full.
        let pages: Vec<_> = (0..3).map(|_| pool.alloc().unwrap()).collect();
        drop(pages);
        let full: Vec<_> = collect
            .lines()
            .into_iter()
            .filter(|l| l.contains("ring full"))
            .collect();
        assert_eq!(full.len(), 2, "{full:?}");
        assert!(full.iter().all(|l| l.starts_with("TRACE")));
        // A map failure on the slow path.
        let refilled = pool.alloc().unwrap(); // the ring's page
        checker.fail_next_maps(1);
        assert!(pool.alloc().is_err());
        let failed = collect.find(&["slow path could not make a page"]);
        assert!(
            failed.starts_with("WARN") && failed.contains("error="),
            "{failed}"
        );
        // Dropped with a page still out: detached.
        let held = pool.alloc().unwrap();
        drop(refilled);
        drop(pool);
        collect.find(&["page pool destroyed", &format!("pool={id}")]);
        let detached = collect.find(&["detached with pages in flight"]);
        assert!(
            detached.starts_with("INFO") && detached.contains("pages=1"),
            "{detached}"
        );
        // Unbind: started, the detached pool's warning, finished with the
        // report.
        let report = device.unbind().unwrap();
        assert!(collect.find(&["unbind started"]).starts_with("INFO"));
        let zombie = collect.find(&["detached pool still holds pages at unbind"]);
        assert!(zombie.starts_with("WARN") && zombie.contains(&format!("pool={id}")));
        let finished = collect.find(&["unbind finished"]);
        assert!(finished.contains(&report.to_string()), "{finished}");
        drop(held);
    });
    assert!(checker.verdict().is_clean(), "{}", checker.report());
}
