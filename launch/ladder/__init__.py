"""`scalegpt ladder`: GPT-3's Figure 3.1 in miniature. Train a family of model sizes that share the
config's data, tokenizer, schedule shape and seed, then fit validation loss against training compute,
L(C) = a * C^(-b) (+ c), and against parameters, L(N), as Kaplan et al. 2020 do and the GPT-3 paper
(Section 3, Figure 3.1) follows.

The config names the top of the ladder: its model is the largest size by default, its token budget over
that model's parameters sets the tokens per parameter of every rung, and its optim.lr is that size's
learning rate. Each rung is an ordinary run directory under the ladder directory (the config's run.dir),
trained through `scalegpt train`, or `scalegpt launch` with `--launch ...`, so each can be sampled,
evaluated and resumed on its own; the ladder only decides what each rung is and whether it is done.

    LADDER/ladder.json              the plan, every rung's final losses and the fits
    LADDER/ladder.png               the figure (figure.py)
    LADDER/L2-d128/                 a rung: config.yaml, metrics.jsonl, checkpoints/
    LADDER/model.n_ctx=256/L2-d128/ a rung of one value of --axis
    LADDER/optim.lr=0.003/L2-d128/  a rung of one learning rate of --lr-sweep (and lr_sweep.png)
    LADDER/C=1e+12/L2-d128/         a rung of one budget of --isoflop (ladder.json's isoflop_fit)
    LADDER/coord.json, coord.png    --coord-check's records and figure

One job per module, each importing only those above it in this list:
    options.py  the command's arguments (light: every `scalegpt` command builds its parser)
    plan.py     the size rule, each rung's budget, learning rate and config, checked before anything trains
    results.py  what the ladder produces: each rung's state on disk, and the fitted power laws
    fit.py      the power-law fits of one frontier
    isoflop.py  --isoflop's fits: a parabola per budget, N_opt, D_opt and L_opt against C
    figure.py   the figure, from results only (Chinchilla's Figure 3 for --isoflop)
    sweep.py    --lr-sweep's results: the best learning rate per width, transfer, the predictive check, figure
    coord.py    --coord-check, the μP coordinate check (in this process; it trains no rungs)
    run.py      training one rung, in a child `scalegpt train` or through `scalegpt launch`
    command.py  `scalegpt ladder`, and `scalegpt plot` of a ladder directory
    compute.py  `scalegpt plan CONFIG --compute C --from LADDER`: a run sized by the IsoFLOP fits
"""
