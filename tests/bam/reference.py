"""An independent, deliberately naive BAM loss written from the equations of the issue (loops, float64, numpy).

It shares no code with ``bam/``: the tests compare the vectorised implementation against it.
"""
import math

import numpy as np


def reference_bam_loss(z, zt=None, *, n_crops, n_large, n_tgt, reg, temp, iters, top_k, pm):
    z = np.asarray(z, dtype=np.float64)
    B = len(z) // n_crops
    zn = [row / math.sqrt(sum(x * x for x in row)) for row in z]
    ztn = zn if zt is None else [row / math.sqrt(sum(x * x for x in row)) for row in np.asarray(zt, np.float64)]
    T = ztn[: n_tgt * B]
    nr, nc = n_crops * B, n_tgt * B
    S = [[float(np.dot(zn[a], T[b])) for b in range(nc)] for a in range(nr)]
    Sp = S if zt is None else [[float(np.dot(ztn[a], T[b])) for b in range(nc)] for a in range(nr)]
    M = [[pm and (a % B) == (b % B) for b in range(nc)] for a in range(nr)]

    # balanced target: Sinkhorn on exp(S/reg) with positives zeroed, transposed to [targets, samples]
    mx = max(Sp[a][b] / reg for a in range(nr) for b in range(nc) if not M[a][b])
    K = [[0.0 if M[s][t] else math.exp(Sp[s][t] / reg - mx) for s in range(nr)] for t in range(nc)]
    tot = sum(sum(row) for row in K)
    K = [[x / tot for x in row] for row in K]
    n_masked = n_tgt if pm else 0
    for _ in range(iters):
        for t in range(nc):
            rs = sum(K[t])
            K[t] = [x * (1.0 / (nc - n_masked)) / rs for x in K[t]]
        for s in range(nr):
            cs = sum(K[t][s] for t in range(nc))
            for t in range(nc):
                K[t][s] *= (1.0 / nr) / cs
    P = []
    for s in range(n_large * B):
        col = sum(K[t][s] for t in range(nc))
        P.append([K[t][s] / col for t in range(nc)])
    if top_k:
        for i in range(B):
            avg = [sum(P[v * B + i][t] for v in range(n_large)) / n_large for t in range(nc)]
            keep = set(sorted(range(nc), key=lambda t: -avg[t])[:top_k])
            for v in range(n_large):
                row = [P[v * B + i][t] if t in keep else 0.0 for t in range(nc)]
                P[v * B + i] = [x / sum(row) for x in row]

    # source: log-softmax of S/temp over the unmasked entries
    logQ = []
    for a in range(nr):
        vals = [S[a][b] / temp for b in range(nc) if not M[a][b]]
        m = max(vals)
        lse = m + math.log(sum(math.exp(x - m) for x in vals))
        logQ.append([S[a][b] / temp - lse for b in range(nc)])

    loss = 0.0
    for v in range(n_large):
        terms = []
        for u in range(n_crops):
            if u == v and n_crops > 1:
                continue
            ce = 0.0
            for i in range(B):
                ce -= sum(P[v * B + i][j] * logQ[u * B + i][j] * (0.0 if M[i][j] else 1.0) for j in range(nc))
            terms.append(ce / B)
        loss += sum(terms) / len(terms)
    return loss / n_large
