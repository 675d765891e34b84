//! The runs `outpost-bench` knows: their names, report sections and load shapes.

use crate::*;

pub(crate) const RUNS: &[RunDef] = &[
    RunDef {
        name: "batch1000",
        section: "1a",
        description: "1 DC, batches of 1,000",
        nodes: 1,
        clients_per_node: 4,
        kind: Kind::Batch(1000),
        accounts: load::ACCOUNTS,
        shape: Shape::Load,
        growth: false,
    },
    RunDef {
        name: "batch10000",
        section: "1a",
        description: "1 DC, batches of 10,000",
        nodes: 1,
        clients_per_node: 4,
        kind: Kind::Batch(10_000),
        accounts: load::ACCOUNTS,
        shape: Shape::Load,
        growth: false,
    },
    RunDef {
        name: "single1",
        section: "1b",
        description: "1 DC, single POSTs",
        nodes: 1,
        clients_per_node: 1,
        kind: Kind::Single,
        accounts: load::ACCOUNTS,
        shape: Shape::Load,
        growth: false,
    },
    RunDef {
        name: "single16",
        section: "1b",
        description: "1 DC, single POSTs",
        nodes: 1,
        clients_per_node: 16,
        kind: Kind::Single,
        accounts: load::ACCOUNTS,
        shape: Shape::Load,
        growth: false,
    },
    RunDef {
        name: "single256",
        section: "1b",
        description: "1 DC, single POSTs",
        nodes: 1,
        clients_per_node: 256,
        kind: Kind::Single,
        accounts: load::ACCOUNTS,
        shape: Shape::Load,
        growth: false,
    },
    RunDef {
        name: "3dc-single",
        section: "2",
        description: "3 DCs, single POSTs at each",
        nodes: 3,
        clients_per_node: 64,
        kind: Kind::Single,
        accounts: load::ACCOUNTS,
        shape: Shape::Load,
        growth: false,
    },
    RunDef {
        name: "3dc-batch",
        section: "2",
        description: "3 DCs, batches of 1,000 at each",
        nodes: 3,
        clients_per_node: 2,
        kind: Kind::Batch(1000),
        accounts: load::ACCOUNTS,
        shape: Shape::Load,
        growth: false,
    },
    RunDef {
        name: "batch1000-1m",
        section: "5",
        description: "1 DC, batches of 1,000 over 1,000,000 accounts",
        nodes: 1,
        clients_per_node: 4,
        kind: Kind::Batch(1000),
        accounts: GROWTH_ACCOUNTS,
        shape: Shape::Load,
        growth: true,
    },
    RunDef {
        name: "catchup-1m",
        section: "5",
        description: "3 DCs, one down while 1,000,000 entries are written, then restarted",
        nodes: 3,
        clients_per_node: 2,
        kind: Kind::Batch(growth::FILL_BATCH as usize),
        accounts: GROWTH_ACCOUNTS,
        shape: Shape::Recover(growth::Recovery::Log, GROWTH_ACCOUNTS),
        growth: true,
    },
    RunDef {
        name: "batch1000-log3m",
        section: "5",
        description: "1 DC, batches of 1,000 onto a retained log of 3,000,000 records",
        nodes: 1,
        clients_per_node: 4,
        kind: Kind::Batch(1000),
        accounts: load::ACCOUNTS,
        shape: Shape::LoadOnLog(GROWTH_LOG_RECORDS),
        growth: true,
    },
    RunDef {
        name: "snapshot-1m",
        section: "5",
        description: "2 DCs, one down while 1,000,000 entries are written past log retention",
        nodes: 2,
        clients_per_node: 2,
        kind: Kind::Batch(growth::FILL_BATCH as usize),
        accounts: GROWTH_ACCOUNTS,
        shape: Shape::Recover(growth::Recovery::Snapshot, GROWTH_ACCOUNTS),
        growth: true,
    },
];

/// The runs to make: those named by `--only` (growth runs too), else the default set, with the
/// growth runs when `--growth` is given. A growth ingest run brings its baseline along.
pub(crate) fn select_runs(only: Option<&[String]>, growth: bool) -> Vec<&'static RunDef> {
    let mut chosen: Vec<&'static RunDef> = RUNS
        .iter()
        .filter(|d| match only {
            Some(o) => o.iter().any(|n| n == d.name),
            None => !d.growth || growth,
        })
        .collect();
    let needs_baseline = chosen
        .iter()
        .any(|d| d.growth && matches!(d.shape, Shape::Load | Shape::LoadOnLog(_)));
    if needs_baseline && !chosen.iter().any(|d| d.name == GROWTH_BASELINE) {
        eprintln!("outpost-bench: running {GROWTH_BASELINE} too, as the baseline of batch1000-1m");
        chosen.insert(
            0,
            RUNS.iter()
                .find(|d| d.name == GROWTH_BASELINE)
                .expect("the baseline is a run"),
        );
    }
    chosen
}
