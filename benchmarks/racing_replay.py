"""What way (c) of benchmarks/racing.py will do, read from way (b)'s store before (c) is run.

Way (b) trains every candidate of every learning-rate choice to the end, and each choice records
every candidate's epochs (inner validation loss and balanced accuracy after each epoch, and the
seconds since its fit started). Successive halving ranks candidates by exactly those numbers
(a paused candidate trains as it does alone: grid/select.py), and racing prunes on the cells'
inner-validation scores, which are the picked candidate's. So (c)'s decisions can be replayed from
(b)'s record without training anything:

- each cell's halving: the rungs of `select.halving_rungs` in epochs at the candidate's own rate
  (`select.rate_epochs`: LP-FT's probe does not count, results version 9), the candidates ranked by
  their best epoch so far (`select.Paused.score`), the survivor picked as `select.best_of` picks;
- the race: the rounds of `racing.race`, each candidate's inner score being its halving pick's
  (`choice.scores` in (b)'s record), pruned by `racing.prune` with racing's defaults;
- the recommendation: the inner-validation leader among the candidates not pruned (`headline.inner_leader`,
  the verdict's rule: an exact tie to fewer trained parameters, then to the first by name);
- the cost: a stopped candidate's seconds up to its last epoch, a survivor's whole fit, plus the
  cell's time outside the candidates' fits as (b) measured it.

It is a forecast that helps decide whether a multi-hour run of (c) is worth starting, not the
figure: the issue's figure is (c) measured (racing.py --ways c). Where the halving pick of the
recommended candidate differs from (b)'s in some fold, (c)'s outer estimate is not in (b)'s store,
and the forecast says in how many folds that happens.

    python benchmarks/racing_replay.py --keep /work/racing_user            # while or after (b) runs
    python benchmarks/racing_replay.py --keep /work/racing_user --eta 4    # another halving rate
    python benchmarks/racing_replay.py --keep /work/racing_user --confidence 0.8   # a weaker race (what-if)
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from medtune.config import RacingConfig
from medtune.evaluation.inner import Score, inner_scores
from medtune.evaluation.store import Store
from medtune.evaluation.headline import inner_leader
from medtune.evaluation.evidence import read_evidence
from medtune.grid.racing import prune
from medtune.grid.select import ETA, halving_rungs, is_probe, rate_epochs


def best_so_far(rows: list[dict]) -> tuple[float, float]:
    """`Paused.score`: (balanced accuracy, -loss) of the lowest-loss epoch among `rows`."""
    best = min(rows, key=lambda r: r["val_loss"]) if rows else {"val_balanced_accuracy": -1, "val_loss": 0}
    return best["val_balanced_accuracy"], -best["val_loss"]


def marked(rows: list[dict]) -> list[dict]:
    """A recorded history with its probe row marked as results version 9 records it (`select.epoch_rows`):
    in older records the probe's row is the one without a training loss."""
    return [{**r, "probe": True} if r.get("train_loss") is None else r for r in rows]


def upto(rows: list[dict], n: int) -> list[dict]:
    """A candidate's rows through its n-th epoch at its own rate (`select.rate_epochs`): what
    `Paused.advance(n)` has evaluated."""
    out, trained = [], 0
    for r in rows:
        if trained == n and not is_probe(r):
            break
        out.append(r)
        trained += not is_probe(r)
    return out


def replay_halving(choice: dict, epochs: int, eta: int) -> tuple[str, dict[str, int]]:
    """(the pick, {candidate: epochs it trains at its rate}) of a halved choice, from (b)'s recorded epochs."""
    histories = {k: marked(h) for k, h in choice["histories"].items()}
    running = list(histories)  # the candidates in their listed order, as halve() starts them
    trained = {k: rate_epochs(histories[k]) for k in running}
    for budget, keep in halving_rungs(len(running), epochs, eta):
        ranked = sorted(running, key=lambda k: best_so_far(upto(histories[k], budget)), reverse=True)
        for k in ranked[keep:]:
            trained[k] = min(budget, rate_epochs(histories[k]))
        running = ranked[:keep]
    scores, losses = choice["scores"], choice["losses"]
    pick = max(running, key=lambda k: (scores[k], -losses[k]))  # select.best_of over the survivors
    return pick, trained


def seconds_until(rows: list[dict], epochs: int) -> float:
    """Seconds since the fit started when its `epochs`-th epoch at its own rate was evaluated."""
    done = upto(marked(rows), epochs)
    return done[-1]["elapsed_seconds"] if done else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=Path, required=True, help="racing.py's --keep folder holding b_no_racing.sqlite")
    ap.add_argument("--eta", type=int, default=ETA, help=f"halving rate to replay (medtune's: {ETA})")
    ap.add_argument("--confidence", type=float, default=RacingConfig().confidence,
                    help="racing's confidence to replay (medtune's default: %(default)s); a what-if, not a setting")
    ap.add_argument("--min-folds", type=int, default=RacingConfig().min_folds,
                    help="racing's min_folds to replay (medtune's default: %(default)s)")
    args = ap.parse_args()
    b_path = args.keep / "b_no_racing.sqlite"
    if not (args.keep / "settings.json").is_file() or not b_path.is_file():
        ap.error(f"{args.keep} holds no way (b) of racing.py (settings.json and b_no_racing.sqlite); run "
                 f"`python benchmarks/racing.py --grid user --keep {args.keep} --ways b` first")
    settings = json.loads((args.keep / "settings.json").read_text())
    epochs = settings["epochs"]
    racing = RacingConfig(confidence=args.confidence, min_folds=args.min_folds)
    with Store(str(b_path), read_only=True) as store:  # never migrate a store it only reads
        m = store.metrics()
        infos = {cid: json.loads(info) for cid, info in
                 store.conn.execute("SELECT cell_id, info_json FROM cells WHERE status='done'")}
        measured = inner_scores(store, m["cell_id"], racing.metric)
    picks = {}  # (group, seed, fold): the replayed halving pick
    cells = {}  # cell id: (group, round, (c)'s Score, (b)'s seconds, (c)'s seconds, same pick as (b))
    for r in m.itertuples():
        info, b_score = infos[r.cell_id], measured[r.cell_id]
        choice = info.get("choice")
        if not choice:  # nothing to choose (the convex probe): (c) trains what (b) trained
            cells[r.cell_id] = (r.group, (r.seed, r.fold), b_score, r.seconds, r.seconds, True)
            continue
        pick, trained = replay_halving(choice, epochs, args.eta)
        picks[(r.group, r.seed, r.fold)] = pick
        hist = choice["histories"]
        outside = r.seconds - sum(h[-1]["elapsed_seconds"] for h in hist.values())
        c_seconds = outside + sum(seconds_until(hist[k], n) for k, n in trained.items())
        score = Score(float(choice["scores"][pick]), b_score.n_val, b_score.n_fit)
        cells[r.cell_id] = (r.group, (r.seed, r.fold), score, r.seconds, c_seconds, pick == choice["picked"])
    first = m.groupby("group").first()
    name = {g: f"{r.backbone} · {r.strategy}" for g, r in first.iterrows()}
    names = {g: f"{r.dataset} {r.backbone} {r.strategy} {r['head']}" for g, r in first.iterrows()}  # racing.candidate
    shares = m.assign(share=m["cell_id"].map(lambda c: infos[c].get("trainable_fraction", np.nan))
                      ).groupby("group")["share"].mean()  # headline.inner_leader's tie-break
    groups = sorted({g for g, *_ in cells.values()})
    rounds = sorted({rk for _, rk, *_ in cells.values()})
    complete = all(sum(1 for g2, *_ in cells.values() if g2 == g) == len(rounds) for g in groups)
    looks = max(len(rounds) - racing.min_folds, 0)
    pruned: dict[str, int] = {}  # group: rounds it ran
    scores: dict[str, dict] = defaultdict(dict)
    by = {(g, rk): (s, cb, cc, same) for g, rk, s, cb, cc, same in cells.values()}
    for i, rk in enumerate(rounds):
        for g in groups:
            if g not in pruned and (g, rk) in by:
                scores[g][rk] = by[g, rk][0]
        if i + 1 < racing.min_folds or i + 1 == len(rounds):
            continue
        active = {g: s for g, s in scores.items() if g not in pruned}
        for g in prune(active, looks, racing.confidence, racing.margin, racing.metric, names):
            pruned[g] = i + 1
    b_total = sum(cb for _, cb, _, _ in by.values())
    c_total = sum(cc for (g, rk), (_, _, cc, _) in by.items() if g not in pruned or rk in rounds[:pruned[g]])
    mean = lambda g: float(np.mean([s.value for s in scores[g].values()]))  # noqa: E731
    b_inner = {g: float(np.mean([measured[cid].value for cid, (g2, *_) in cells.items() if g2 == g])) for g in groups}
    frame = first.loc[groups].reset_index()[["group", "backbone", "strategy", "head"]]
    frame["share"] = frame["group"].map(shares)
    b_lead = inner_leader(frame.assign(inner=[b_inner[g] for g in frame["group"]]))
    running = frame[~frame["group"].isin(list(pruned))]
    c_lead = inner_leader(running.assign(inner=[mean(g) for g in running["group"]]))
    differ = sum(1 for (g, _), (*_, same) in by.items() if g == c_lead and not same)
    print(f"(b) {len(cells)} cells of {len(groups)} candidates x {len(rounds)} rounds"
          f"{'' if complete else ' (incomplete: a forecast of the rounds done so far)'}: {b_total:.0f} cell-seconds")
    print(f"(c) replayed with halving eta {args.eta} and racing at confidence {racing.confidence:g}, min_folds "
          f"{racing.min_folds}: {c_total:.0f} cell-seconds, "
          f"{c_total / b_total:.2f} of (b)'s")
    print(f"  {'candidate':<48} {'folds':>5} {'inner (b)':>9} {'inner (c)':>9} {'s (b)':>7} {'s (c)':>7}  race")
    for g in sorted(groups, key=lambda g: -b_inner[g]):
        mine = [(rk, v) for (g2, rk), v in by.items() if g2 == g]
        sb = sum(cb for _, (_, cb, _, _) in mine)
        sc = sum(cc for rk, (_, _, cc, _) in mine if g not in pruned or rk in rounds[:pruned[g]])
        race = f"pruned after round {pruned[g]}" if g in pruned else ""
        print(f"  {name[g]:<48} {len(mine):>5} {b_inner[g]:>9.3f} {mean(g):>9.3f} {sb:>7.0f} {sc:>7.0f}  {race}")
    c_path = args.keep / "c_racing.sqlite"
    if c_path.exists():  # (c) was run: how well the replay foretold it
        check_against(c_path, m, cells, picks, pruned, name, c_total)
    print(f"recommendation: (b) {name[b_lead]} (inner {b_inner[b_lead]:.3f}); (c) {name[c_lead]} (inner "
          f"{mean(c_lead):.3f}); "
          f"{'the same' if b_lead == c_lead else 'DIFFERENT'}; the halving pick differs from (b)'s in {differ} of "
          f"the recommended candidate's folds")


def check_against(c_path: Path, m, cells: dict, picks: dict, pruned: dict, name: dict, c_total: float) -> None:
    """Compare the replay with (c) as it ran: the halving picks, the pruned candidates, the cell-seconds.
    The group keys of (b) and (c) differ (halving is part of a cell), so cells pair by backbone, strategy,
    head, seed and fold."""
    with Store(str(c_path), read_only=True) as store:
        cm = store.metrics()
        infos = {cid: json.loads(info) for cid, info in
                 store.conn.execute("SELECT cell_id, info_json FROM cells WHERE status='done'")}
        c_pruned = {name_of(r) for r in cm.itertuples() if r.pruned}
    lead = read_evidence(c_path).inner_leaders
    first = cm.groupby("group").first()
    c_leads = sorted(f"{first.loc[g].backbone} · {first.loc[g].strategy}" for g in lead.values())
    group_of = {name_of(r): r.group for r in m.itertuples()}
    same = differ = 0
    for r in cm.itertuples():
        choice = infos[r.cell_id].get("choice")
        key = (group_of.get(name_of(r)), r.seed, r.fold)
        if choice and key in picks:
            same, differ = same + (choice["picked"] == picks[key]), differ + (choice["picked"] != picks[key])
    replayed = {name[g] for g in pruned}
    print(f"(c) as run: halving picks as replayed in {same} of {same + differ} cells; pruned "
          f"{sorted(c_pruned) or 'nothing'} (replayed: {sorted(replayed) or 'nothing'}); "
          f"{cm['seconds'].sum():.0f} cell-seconds (replayed {c_total:.0f}); recommends {', '.join(c_leads)}")


def name_of(r) -> str:
    return f"{r.backbone} · {r.strategy}"


if __name__ == "__main__":
    main()
