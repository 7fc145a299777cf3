# tests/test_bwd_chunk_b_mma_layout.py: bwd_chunk_b_mma_kernel's fragment bookkeeping, on the CPU.
"""A lane-by-lane transcription of bwd_chunk_b_mma.cuh's index logic (ldmatrix addresses, the
per-warp tile table, k-block ranges, masks, which rows / columns are stored), run through an
emulation of ldmatrix (.x2 / .x4, .trans) and mma.sync m16n8k16 per the PTX fragment layouts, in
float64 without rounding, against the math of bwd_chunk_b_kernel. Shared-memory entries no warp
writes are NaN, so a product that reads one fails. Why: the kernel was written without a GPU;
this catches a wrong lane formula, a missing tile or a wrong mask (O(1) errors) anywhere. The
per-warp tile table is read from the header; the rest checks the transcription, not the CUDA
source (keep the two in step): the kernel itself is checked on a GPU by test_bwd_chunk_b_mma.py.
"""
import os
import re

import numpy as np
import pytest

BT, V = 64, 128

def ldsm(tile, addrs, nmat, trans):
    # addrs[l] = (row, col) for lanes 0..8*nmat-1; returns regs[lane][q] = (e0, e1)
    out = [[None]*nmat for _ in range(32)]
    for q in range(nmat):
        M = np.array([tile[addrs[8*q+j][0], addrs[8*q+j][1]:addrs[8*q+j][1]+8] for j in range(8)])
        if trans: M = M.T
        for i in range(32):
            out[i][q] = (M[i//4, 2*(i%4)], M[i//4, 2*(i%4)+1])
    return out

def mma(C, A, b0, b1):
    # C[lane] 4 floats; A[lane] 4 regs (pairs), b0/b1[lane] pairs. Build full matrices.
    Am = np.zeros((16,16)); Bm = np.zeros((16,8))
    for l in range(32):
        g, t = l//4, l%4
        for (r, c0), reg in zip([(g,2*t),(g+8,2*t),(g,2*t+8),(g+8,2*t+8)], A[l]):
            Am[r,c0], Am[r,c0+1] = reg
        Bm[2*t,g], Bm[2*t+1,g] = b0[l]; Bm[2*t+8,g], Bm[2*t+9,g] = b1[l]
    D = Am @ Bm
    for l in range(32):
        g, t = l//4, l%4
        C[l][0] += D[g,2*t]; C[l][1] += D[g,2*t+1]; C[l][2] += D[g+8,2*t]; C[l][3] += D[g+8,2*t+1]

def x4(tile, f, trans=False):
    return ldsm(tile, [f(l) for l in range(32)], 4, trans)
def x2(tile, f, trans=False):
    return ldsm(tile, [f(l) for l in range(32)], 2, trans)
def regs(R, idx):  # pick registers per lane
    return [[R[l][i] for i in idx] for l in range(32)]
def reg1(R, i): return [R[l][i] for l in range(32)]

def _tile_table():
    # The per-warp tile table as the kernel has it (kTileRb / kTileNt0 / kTileCnt in the header:
    # nibble w is warp w's entry), so a wrong table in the source fails here, not only in a copy.
    src = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "csrc", "cuda", "bwd_chunk_b_mma.cuh")).read()
    def nibbles(name):
        m = re.search(name + r" = 0x([0-9a-fA-F]+)u", src)
        assert m, f"{name} not found in bwd_chunk_b_mma.cuh"
        x = int(m.group(1), 16)
        return [(x >> (4 * w)) & 15 for w in range(8)]
    return nibbles("kTileRb"), nibbles("kTileNt0"), nibbles("kTileCnt")


RB, NT0, CNT = _tile_table()

def kernel(dvn, v, do, vn, Akk_raw, part, beta_raw, len_, scale):
    dbeta_parts = {}
    # global "rows" beyond len: zero-filled tiles
    rows = np.arange(BT) < len_
    dvns = np.where(rows[:,None], dvn, 0); vs = np.where(rows[:,None], v, 0)
    dos = np.where(rows[:,None], do, 0); vns = np.where(rows[:,None], vn, 0)
    akk = np.zeros((BT,BT))
    for r in range(BT):
        for j in range(BT):
            if r < len_ and j <= r: akk[r,j] = Akk_raw[r,j]
    betas = np.where(rows, beta_raw, 0)
    dAqk = np.full((BT,BT), np.nan); dL = np.full((BT,BT), np.nan)
    dv = np.full((BT,V), np.nan); dbeta = np.full(BT, np.nan)
    for r in range(BT):
        for c in range(0,BT,4):
            if r < len_ and c >= 16*(r//16)+16: dAqk[r,c:c+4] = 0; dL[r,c:c+4] = 0
    dakk = np.full((BT,BT), np.nan); tmp = np.full((BT,BT), np.nan)
    # phase 1
    for w in range(8):
        rb, nt0, cnt = RB[w], NT0[w], CNT[w]
        pk = [[[0.0]*4 for _ in range(32)] for _ in range(3)]
        pq = [[[0.0]*4 for _ in range(32)] for _ in range(3)]
        for kk in range(V//16):
            fa = lambda l: (16*rb + l%16, 8*(l//16) + 16*kk)
            fb = lambda l: (8*nt0 + 8*(l//16) + l%8, 8*((l//8)%2) + 16*kk)
            fb2 = lambda l: (8*(nt0+2) + l%8, 8*((l//8)%2) + 16*kk)
            ak = x4(dvns, fa); aq = x4(dos, fa); bk = x4(vs, fb); bq = x4(vns, fb)
            mma(pk[0], ak, reg1(bk,0), reg1(bk,1)); mma(pk[1], ak, reg1(bk,2), reg1(bk,3))
            mma(pq[0], aq, reg1(bq,0), reg1(bq,1)); mma(pq[1], aq, reg1(bq,2), reg1(bq,3))
            if cnt == 3:
                ck = x2(vs, lambda l: fb2(l%16)); cq = x2(vns, lambda l: fb2(l%16))
                mma(pk[2], ak, reg1(ck,0), reg1(ck,1)); mma(pq[2], aq, reg1(cq,0), reg1(cq,1))
        for i in range(cnt):
            for l in range(32):
                g, t4 = l//4, l%4
                for hf in range(2):
                    r = 16*rb + g + 8*hf; j = 8*(nt0+i) + 2*t4
                    rr = min(r, len_-1)
                    pt = part[0][rr] + part[1][rr]
                    if r < len_:
                        dAqk[r,j] = scale*pq[i][l][2*hf] if (j < len_ and j <= r) else 0
                        dAqk[r,j+1] = scale*pq[i][l][2*hf+1] if (j+1 < len_ and j+1 <= r) else 0
                    dakk[r,j] = pt[j] + betas[j]*pk[i][l][2*hf] if (r < len_ and j < r) else 0
                    dakk[r,j+1] = pt[j+1] + betas[j+1]*pk[i][l][2*hf+1] if (r < len_ and j+1 < r) else 0
    for w in range(8):
        q, pair = w % 4, w // 4
        rbs = [0 if pair == 0 else 1, 3 if pair == 0 else 2]
        dvo = [[[[0.0]*4 for _ in range(32)] for _ in range(4)] for _ in range(2)]
        for kb in range(rbs[0], 4):
            fb = lambda l: (16*kb + 8*((l//8)%2) + l%8, 32*q + 8*(l//16))
            b01 = x4(dvns, fb, True); b23 = x4(dvns, lambda l: (fb(l)[0], fb(l)[1]+16), True)
            for s in range(2):
                if kb >= rbs[s]:
                    a = x4(akk, lambda l: (16*kb + 8*(l//16) + l%8, 16*rbs[s] + 8*((l//8)%2)), True)
                    mma(dvo[s][0], a, reg1(b01,0), reg1(b01,1)); mma(dvo[s][1], a, reg1(b01,2), reg1(b01,3))
                    mma(dvo[s][2], a, reg1(b23,0), reg1(b23,1)); mma(dvo[s][3], a, reg1(b23,2), reg1(b23,3))
        for s in range(2):
            for hf in range(2):
                for g in range(8):
                    r = 16*rbs[s] + g + 8*hf
                    tot = 0.0
                    for t4 in range(4):
                        l = 4*g + t4
                        for n in range(4):
                            c = 32*q + 8*n + 2*t4
                            x, y = dvo[s][n][l][2*hf], dvo[s][n][l][2*hf+1]
                            tot += x*vs[r,c] + y*vs[r,c+1]
                            if r < len_: dv[r,c] = betas[r]*x; dv[r,c+1] = betas[r]*y
                    dbs_q = dbeta_parts.setdefault(r, {}); dbs_q[q] = tot
    for r in range(len_):
        dbeta[r] = sum(dbeta_parts[r][qq] for qq in range(4))
    # tmp
    for w in range(8):
        rb, nt0, cnt = RB[w], NT0[w], CNT[w]
        tp = [[[0.0]*4 for _ in range(32)] for _ in range(3)]
        for kb in range(rb+1):
            b = x4(akk, lambda l: (8*nt0 + 8*(l//16) + l%8, 8*((l//8)%2) + 16*kb))
            if cnt == 3: b2 = x2(akk, lambda l: (8*(nt0+2) + l%8, 8*(((l%16)//8)%2) + 16*kb))
            for src in (dakk,):  # the kernel runs hi, then lo: hi + lo = dakk here
                a = x4(src, lambda l: (16*rb + l%16, 8*(l//16) + 16*kb))
                mma(tp[0], a, reg1(b,0), reg1(b,1)); mma(tp[1], a, reg1(b,2), reg1(b,3))
                if cnt == 3: mma(tp[2], a, reg1(b2,0), reg1(b2,1))
        for i in range(cnt):
            for l in range(32):
                g, t4 = l//4, l%4
                for hf in range(2):
                    r = 16*rb + g + 8*hf; j = 8*(nt0+i) + 2*t4
                    tmp[r,j], tmp[r,j+1] = tp[i][l][2*hf], tp[i][l][2*hf+1]
    for w in range(8):
        rb, nt0, cnt = RB[w], NT0[w], CNT[w]
        dl = [[[0.0]*4 for _ in range(32)] for _ in range(3)]
        for kb in range(rb, 4):
            a = x4(akk, lambda l: (16*kb + 8*(l//16) + l%8, 16*rb + 8*((l//8)%2)), True)
            brow = lambda l: 16*kb + 8*((l//8)%2) + l%8
            b = x4(tmp, lambda l: (brow(l), 8*nt0 + 8*(l//16)), True)
            mma(dl[0], a, reg1(b,0), reg1(b,1)); mma(dl[1], a, reg1(b,2), reg1(b,3))
            if cnt == 3:
                b2 = x2(tmp, lambda l: (brow(l%16), 8*(nt0+2)), True)
                mma(dl[2], a, reg1(b2,0), reg1(b2,1))
        for i in range(cnt):
            for l in range(32):
                g, t4 = l//4, l%4
                for hf in range(2):
                    r = 16*rb + g + 8*hf; j = 8*(nt0+i) + 2*t4
                    if r < len_:
                        dL[r,j] = -dl[i][l][2*hf] if (j < r and j < len_) else 0
                        dL[r,j+1] = -dl[i][l][2*hf+1] if (j+1 < r and j+1 < len_) else 0
    return dAqk, dL, dv, dbeta

def reference(dvn, v, do, vn, Akk_raw, part, beta_raw, len_, scale):
    rows = np.arange(BT) < len_
    Z = lambda X: np.where(rows[:,None], X, 0)
    dvn, v, do, vn = Z(dvn), Z(v), Z(do), Z(vn)
    I = np.arange(BT)
    keep = (I[:,None] < len_) & (I[None,:] < len_) & (I[None,:] <= I[:,None])
    akk = np.where(keep, Akk_raw, 0)
    vbeta = np.where(rows, beta_raw, 0)
    dakk = np.where((I[:,None] < len_) & (I[None,:] < len_), part[0] + part[1], 0)
    dakk = dakk + dvn @ (vbeta[:,None]*v).T
    daqk = do @ vn.T
    dvo = akk.T @ dvn
    dv = vbeta[:,None]*dvo
    dbeta = (dvo*v).sum(1)
    inn = (I[:,None] < len_) & (I[None,:] < len_)
    dakk = np.where(inn & (I[None,:] < I[:,None]), dakk, 0)
    dAqk = np.where(inn & (I[None,:] <= I[:,None]), scale*daqk, 0)
    tmp = dakk @ akk.T
    d2 = akk.T @ tmp
    dL = np.where((I[None,:] < I[:,None]) & (I[None,:] < len_), -d2, 0)
    return dAqk[:len_], dL[:len_], dv[:len_], dbeta[:len_]


@pytest.mark.parametrize("len_", [64, 63, 37, 16, 1])
def test_chunk_b_mma_fragment_logic(len_):
    rng = np.random.default_rng(len_)
    X = lambda *s: rng.standard_normal(s)
    args = (X(BT, V), X(BT, V), X(BT, V), X(BT, V), X(BT, BT), [X(BT, BT), X(BT, BT)], X(BT), len_, 0.3)
    got = kernel(*args)
    ref = reference(*args)
    for name, gt, rf in zip(("dAqk", "dL", "dv", "dbeta"), got, ref):
        gt = gt[:len_]
        assert not np.isnan(gt).any(), (name, np.argwhere(np.isnan(gt))[:5])
        err = np.abs(gt - rf).max() / (np.abs(rf).max() + 1e-30)
        assert err < 1e-12, (name, err)
