//! Replays the committed fuzz corpora (`fixtures/fuzz/<target>/`) through the same functions the
//! cargo-fuzz targets run, on stable Rust, so CI catches a regression on any input a fuzzer once
//! found interesting. Also measures what postcard allocates for hostile length prefixes.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use outpost::wire::{
    decode_frame, decode_message, fuzz_element_json, fuzz_wire_frame, FrameError,
    FRAME_BYTES_MAX_DEFAULT,
};

/// A fuzz target's body.
type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 2] = [
    ("wire_frame", fuzz_wire_frame),
    ("element_json", fuzz_element_json),
];

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fixtures/fuzz")
        .join(target)
}

#[test]
fn fuzz_corpus_replays_without_panic() {
    let mut failures = Vec::new();
    for (target, run) in TARGETS {
        let dir = corpus_dir(target);
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
        let mut files: Vec<PathBuf> = entries.map(|e| e.unwrap().path()).collect();
        files.sort();
        assert!(!files.is_empty(), "corpus {} is empty", dir.display());
        for path in files {
            let data = std::fs::read(&path).unwrap();
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                failures.push(path.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "panicked on: {}", failures.join(", "));
}

// Counts the bytes allocated by the current thread while tracking is on. Tests run on threads
// of their own, so one test's measurement is not disturbed by another's.
//
// `unsafe` is the price of a global allocator: it only forwards to `System`, unchanged.
struct Tracking;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let on = TRACKING.try_with(Cell::get).unwrap_or(false);
    if on {
        let live = LIVE.with(|l| {
            l.set(l.get() + delta);
            l.get()
        });
        PEAK.with(|p| p.set(p.get().max(live)));
    }
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            note(layout.size() as isize);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        note(-(layout.size() as isize));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            note(new_size as isize - layout.size() as isize);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Peak bytes allocated (and not yet freed) on this thread while `f` runs.
fn peak_bytes<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LIVE.with(|l| l.set(0));
    PEAK.with(|p| p.set(0));
    TRACKING.with(|t| t.set(true));
    let out = f();
    TRACKING.with(|t| t.set(false));
    (out, PEAK.with(Cell::get).max(0) as usize)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A frame: `prefix`, a varint claiming 2^60, then `pad` zero bytes.
fn claiming_frame(prefix: &[u8], pad: usize) -> Vec<u8> {
    let mut payload = prefix.to_vec();
    varint(1 << 60, &mut payload);
    payload.resize(payload.len() + pad, 0);
    let mut f = (payload.len() as u32).to_be_bytes().to_vec();
    f.extend(payload);
    f
}

#[test]
fn bounded_memory_hostile_length_prefix_is_not_preallocated() {
    // Payload prefixes up to a sequence or string length, one for every place a length
    // travels. Variant indexes: Hello 0, Elements 1, CatchUpBatch 4, Snapshot 5, Goodbye 6.
    let record_head: &[u8] = &[1, 1]; // origin 1, oseq 1; the account length follows
    let cases: Vec<(&str, Vec<u8>)> = vec![
        // Hello: protocol 1, node 1, role 0, name "", epoch 0, resume None; then marks.
        ("hello.marks", vec![0, 1, 1, 0, 0, 0, 0]),
        // Hello with one mark (origin 1, contiguous 0); then its `above`.
        ("hello.marks[0].above", vec![0, 1, 1, 0, 0, 0, 0, 1, 1, 0]),
        // Elements: epoch, after, upto; then items.
        ("elements.items", vec![1, 0, 0, 9]),
        // Elements with one item (lseq 1), record head; then the account.
        (
            "elements.items[0].account",
            [&[1u8, 0, 0, 9, 1, 1][..], record_head].concat(),
        ),
        // ... account "a", etype 0, version (1, 0, 1); then the element bytes.
        (
            "elements.items[0].element",
            [
                &[1u8, 0, 0, 9, 1, 1][..],
                record_head,
                &[1, b'a', 0, 1, 0, 1],
            ]
            .concat(),
        ),
        // CatchUpBatch: origin; then items.
        ("catch_up_batch.items", vec![4, 1]),
        // Snapshot: epoch; then entries.
        ("snapshot.entries", vec![5, 0]),
        // Goodbye: code; then the reason.
        ("goodbye.reason", vec![6, 0]),
    ];
    for (what, prefix) in cases {
        let f = claiming_frame(&prefix, 96);
        let (r, peak) = peak_bytes(|| decode_frame(&f, FRAME_BYTES_MAX_DEFAULT));
        assert!(matches!(r, Err(FrameError::Decode(_))), "{what}: {r:?}");
        assert!(
            peak < 16 * 1024,
            "{what}: decoding a {}-byte frame that claims 2^60 items peaked at {peak} bytes",
            f.len()
        );
    }
}

#[test]
fn bounded_memory_decoded_size_stays_proportional_to_the_frame() {
    // The densest expansion there is: a Hello whose whole payload is empty marks, 3 bytes on
    // the wire and 48 in memory each, in a frame at the default limit. Decoding is bounded by
    // the frame limit times this ratio (plus vector growth); a lower limit bounds it lower.
    let marks = (FRAME_BYTES_MAX_DEFAULT - 16) / 3;
    let mut payload = vec![0, 1, 1, 0, 0, 0, 0];
    varint(marks as u64, &mut payload);
    payload.resize(payload.len() + marks * 3, 0);
    assert!(payload.len() <= FRAME_BYTES_MAX_DEFAULT);
    let (r, peak) = peak_bytes(|| decode_message(&payload).map(|_| ()));
    r.unwrap();
    let ratio = peak / payload.len();
    eprintln!(
        "densest Hello: {} payload bytes decode with a peak of {peak} bytes ({ratio}x)",
        payload.len()
    );
    assert!(ratio <= 40, "decoding peaked at {ratio}x the payload");
}
