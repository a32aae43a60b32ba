//! A product's bands of result rows shared out among the threads ggml runs
//! a custom op on, so that a thread slowed for a while (the two vCPUs of a
//! VM are not always two cores' worth) does not hold the other up at the
//! node's end.
//!
//! Each thread owns a contiguous range of the bands and takes them from
//! its front, in order; one that runs out takes the last band not yet taken
//! of another's range (from the back). The ranges stay contiguous, so each
//! thread still reads its own part of the weight and writes its own rows,
//! and the boundary moves to where the threads' speeds put it. With a
//! fixed half each, the faster of two threads idled through 11 % of a
//! product's time (the median over a step's products; one thread was
//! slower for tens of products in a row, then the other), 4.5–8.5 % of
//! all the threads' time in the weights' products. Shared out, 1.1–1.7 %.
//!
//! A product summed in several passes (each adding to the result) takes
//! its bands anew in each pass; a band's pass waits for its previous pass,
//! which another thread may still be running.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// This call's part in one node's product: the node (its address, the
/// key under which its threads meet), and thread `ith` of `nth`.
#[derive(Clone, Copy)]
pub(super) struct Team {
    pub key: usize,
    pub ith: usize,
    pub nth: usize,
}

impl Team {
    /// A call that runs the whole product by itself.
    pub fn alone() -> Self {
        Team { key: 0, ith: 0, nth: 1 }
    }
}

/// The bands of one product's passes, as its threads take them. Kept for
/// the next product once its threads are through with it (a product's
/// counters allocated and freed as it runs left glibc's heap holding
/// pages: +4–28 MiB of peak RSS on a checkpointed step).
pub(super) struct Bands {
    /// The product's key while it runs; 0 while the entry is free.
    key: AtomicUsize,
    bands: AtomicUsize,
    nth: AtomicUsize,
    /// Per pass and thread: bands taken from the front (low 32 bits) and
    /// from the back (high 32) of that thread's range.
    taken: Vec<AtomicU64>,
    /// Passes done, per band.
    passes_done: Vec<AtomicU32>,
    /// Threads yet to leave (the last one out frees the entry).
    left: AtomicUsize,
}

/// The entries for the products being run now (a few at most: one per
/// graph being computed), and free ones.
static RUNNING: Mutex<Vec<Arc<Bands>>> = Mutex::new(Vec::new());

/// A band taken: its index, and whether from the front of the taker's own
/// range (the taker's next band is then the one after it).
#[derive(Clone, Copy)]
pub(super) struct Taken {
    pub band: usize,
    pub own: bool,
}

impl Bands {
    /// Joins `team`'s product (of two threads or more) of `bands` bands
    /// summed in `passes` passes: the first of its threads to arrive sets
    /// it up, in a free entry if one is large enough.
    pub fn join(team: Team, bands: usize, passes: usize) -> Arc<Bands> {
        let counters = passes * team.nth;
        // A poisoned lock only means another thread panicked (which aborts
        // under ggml's C frames); the list itself stays consistent.
        let mut running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = running.iter().find(|b| b.key.load(Ordering::Relaxed) == team.key) {
            return b.clone();
        }
        let free = running
            .iter()
            .find(|b| b.key.load(Ordering::Relaxed) == 0 && b.taken.len() >= counters && b.passes_done.len() >= bands);
        let b = match free {
            Some(b) => {
                b.taken[..counters].iter().for_each(|c| c.store(0, Ordering::Relaxed));
                b.passes_done[..bands]
                    .iter()
                    .for_each(|c| c.store(0, Ordering::Relaxed));
                b.clone()
            }
            None => {
                let b = Arc::new(Bands {
                    key: AtomicUsize::new(0),
                    bands: AtomicUsize::new(0),
                    nth: AtomicUsize::new(0),
                    taken: (0..counters.max(64)).map(|_| AtomicU64::new(0)).collect(),
                    passes_done: (0..bands.max(1024)).map(|_| AtomicU32::new(0)).collect(),
                    left: AtomicUsize::new(0),
                });
                running.push(b.clone());
                b
            }
        };
        // The other threads see these through the lock.
        b.bands.store(bands, Ordering::Relaxed);
        b.nth.store(team.nth, Ordering::Relaxed);
        b.left.store(team.nth, Ordering::Relaxed);
        b.key.store(team.key, Ordering::Relaxed);
        b
    }

    /// The range of bands thread `t` owns.
    fn range(&self, t: usize) -> (usize, usize) {
        let (bands, nth) = (self.bands.load(Ordering::Relaxed), self.nth.load(Ordering::Relaxed));
        (bands * t / nth, bands * (t + 1) / nth)
    }

    /// A band for thread `ith` in `pass`: the next of its own range, else
    /// the last untaken one of another's; None when every band of the pass
    /// is taken.
    pub fn take(&self, pass: usize, ith: usize) -> Option<Taken> {
        let nth = self.nth.load(Ordering::Relaxed);
        for s in 0..nth {
            let t = (ith + s) % nth;
            let (lo, hi) = self.range(t);
            let cell = &self.taken[pass * nth + t];
            let mut cur = cell.load(Ordering::Relaxed);
            loop {
                let (front, back) = ((cur & 0xffff_ffff) as usize, (cur >> 32) as usize);
                if front + back >= hi - lo {
                    break;
                }
                let next = if s == 0 { cur + 1 } else { cur + (1 << 32) };
                match cell.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Relaxed) {
                    Ok(_) => {
                        return Some(if s == 0 {
                            Taken {
                                band: lo + front,
                                own: true,
                            }
                        } else {
                            Taken {
                                band: hi - 1 - back,
                                own: false,
                            }
                        });
                    }
                    Err(now) => cur = now,
                }
            }
        }
        None
    }

    /// Waits until `band`'s passes before `pass` are done (by whichever
    /// thread took them; each was taken before any thread moved on to a
    /// later pass, so it is being run).
    pub fn wait(&self, band: usize, pass: usize) {
        while (self.passes_done[band].load(Ordering::Acquire) as usize) < pass {
            std::hint::spin_loop();
        }
    }

    /// Marks `band`'s `pass` done (its results written).
    pub fn done(&self, band: usize, pass: usize) {
        self.passes_done[band].store(pass as u32 + 1, Ordering::Release);
    }

    /// This thread is through with the product: the last one out frees
    /// the entry, so that the node's next run (after ggml's barrier, which
    /// waits for every thread's return) starts afresh.
    pub fn leave(self: Arc<Self>) {
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 {
            let _running = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
            self.key.store(0, Ordering::Relaxed);
        }
    }
}

/// How one thread of a product goes through its bands: alone (every band
/// of every pass, in order), or sharing them with the product's other
/// threads.
pub(super) enum Schedule {
    Alone {
        bands: usize,
        passes: usize,
        pass: usize,
        next: usize,
    },
    Shared {
        bands: Arc<Bands>,
        passes: usize,
        ith: usize,
    },
}

impl Schedule {
    /// `team`'s schedule over `bands` bands summed in `passes` passes.
    pub fn new(team: Team, bands: usize, passes: usize) -> Self {
        if team.nth == 1 {
            Schedule::Alone {
                bands,
                passes,
                pass: 0,
                next: 0,
            }
        } else {
            Schedule::Shared {
                bands: Bands::join(team, bands, passes),
                passes,
                ith: team.ith,
            }
        }
    }

    /// This thread's next band in `pass` (passes are gone through in
    /// order), once its earlier passes are done; None when the pass has
    /// no band left.
    pub fn take(&mut self, pass: usize) -> Option<Taken> {
        match self {
            Schedule::Alone {
                bands, pass: at, next, ..
            } => {
                if *at != pass {
                    (*at, *next) = (pass, 0);
                }
                (*next < *bands).then(|| {
                    *next += 1;
                    Taken {
                        band: *next - 1,
                        own: true,
                    }
                })
            }
            Schedule::Shared { bands, ith, .. } => {
                let t = bands.take(pass, *ith)?;
                bands.wait(t.band, pass);
                Some(t)
            }
        }
    }

    /// Marks `band`'s `pass` done.
    pub fn done(&self, band: usize, pass: usize) {
        if let Schedule::Shared { bands, .. } = self {
            bands.done(band, pass);
        }
    }

    /// The (band, pass) this thread most likely runs after `t` of `pass`
    /// (to fetch its data ahead): the next band of its own range, or its
    /// first in the next pass; None after a band taken from another.
    pub fn after(&self, t: Taken, pass: usize) -> Option<(usize, usize)> {
        let (first, end, passes) = match self {
            Schedule::Alone { bands, passes, .. } => (0, *bands, *passes),
            Schedule::Shared { bands, passes, ith } => {
                let (lo, hi) = bands.range(*ith);
                (lo, hi, *passes)
            }
        };
        if !t.own {
            None
        } else if t.band + 1 < end {
            Some((t.band + 1, pass))
        } else {
            (pass + 1 < passes && first < end).then_some((first, pass + 1))
        }
    }

    /// This thread is through with the product.
    pub fn finish(self) {
        if let Schedule::Shared { bands, .. } = self {
            bands.leave();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two threads taking the bands of three passes take each (band, pass)
    /// exactly once, and each owner takes its own from the front in order.
    #[test]
    fn every_band_of_every_pass_is_taken_once() {
        let (bands, passes) = (13, 3);
        let key = 0x5eed;
        let seen: Vec<Vec<(usize, usize, bool)>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|ith| {
                    s.spawn(move || {
                        let b = Bands::join(Team { key, ith, nth: 2 }, bands, passes);
                        let mut got = Vec::new();
                        for pass in 0..passes {
                            while let Some(t) = b.take(pass, ith) {
                                b.wait(t.band, pass);
                                // Thread 1 is slow: thread 0 takes some of its bands.
                                if ith == 1 {
                                    std::thread::sleep(std::time::Duration::from_millis(2));
                                }
                                got.push((t.band, pass, t.own));
                                b.done(t.band, pass);
                            }
                        }
                        b.leave();
                        got
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<(usize, usize)> = seen.iter().flatten().map(|&(b, p, _)| (b, p)).collect();
        all.sort();
        let want: Vec<(usize, usize)> = (0..bands).flat_map(|b| (0..passes).map(move |p| (b, p))).collect();
        assert_eq!(all, want);
        assert!(
            seen[0].iter().any(|&(b, _, own)| !own && b >= 6),
            "thread 0 took none of thread 1's bands"
        );
        for (ith, got) in seen.iter().enumerate() {
            for pass in 0..passes {
                let own: Vec<usize> = got
                    .iter()
                    .filter(|&&(_, p, o)| p == pass && o)
                    .map(|&(b, _, _)| b)
                    .collect();
                let first = if ith == 0 { 0 } else { 6 };
                assert_eq!(own, (first..first + own.len()).collect::<Vec<_>>());
            }
        }
        assert!(
            RUNNING
                .lock()
                .unwrap()
                .iter()
                .all(|b| b.key.load(Ordering::Relaxed) != key),
            "the product's entry was not freed"
        );
        // A second product of other sizes reuses a free entry, from scratch.
        let before = RUNNING.lock().unwrap().len();
        let b = Bands::join(Team { key: 7, ith: 0, nth: 2 }, 5, 2);
        assert_eq!(RUNNING.lock().unwrap().len(), before, "a free entry was not reused");
        let mut got = Vec::new();
        while let Some(t) = b.take(1, 0) {
            got.push(t.band);
        }
        assert_eq!(got, [0, 1, 4, 3, 2], "own range first, then the other's from its back");
        b.clone().leave();
        b.leave();
    }
}
