//! A pool built, and allocated from, on another thread while the device
//! unbinds. The build is refused, or the pool is registered in time for
//! unbind to close it; either way nothing maps after unbind.
#![cfg(loom)]

use loom::sync::Arc;
use pagepool::{AllocError, BuildError};
use pagepool_loom_tests::{model, spawn, Harness, Outcomes};

static BUILD: Outcomes = Outcomes::new();

#[test]
fn pool_built_while_unbinding() {
    model(|| {
        let mut h = Harness::new();
        let device = Arc::clone(&h.device);
        let t = spawn(move || {
            let built = device
                .pool_builder()
                .cache_size(1)
                .refill_batch(1)
                .ring_size(1)
                .build();
            match built {
                Err(BuildError::Unbound) => "build refused: unbound",
                Err(e) => panic!("unexpected {e:?}"),
                Ok(mut pool) => {
                    let outcome = match pool.alloc() {
                        Ok(page) => {
                            drop(page);
                            "built and mapped before unbind"
                        }
                        Err(AllocError::Unbound) => "built, then alloc refused: unbound",
                        Err(e) => panic!("unexpected {e:?}"),
                    };
                    drop(pool);
                    outcome
                }
            }
        });
        let report = h.device.unbind().unwrap();
        h.unbound(&report);
        BUILD.saw(t.join().unwrap());
        h.finish();
    });
    BUILD.assert_seen(&[
        "build refused: unbound",
        "built and mapped before unbind",
        "built, then alloc refused: unbound",
    ]);
}
