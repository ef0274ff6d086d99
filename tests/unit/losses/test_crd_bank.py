"""CRD's memory bank update: the old row weighted by the momentum."""
import torch

from kd2m import losses
from kd2m.losses import TermContext


# 2 ---------------------------------------------------------------------------------------------
def test_crd_bank_update_weights_the_old_row_by_the_momentum():
    """RepDistiller's memory update at nce_m = 0.9: m ← normalize(0.9·m + 0.1·v) (the default 0.5
    cannot tell the two weights apart)."""
    g = torch.Generator().manual_seed(3)
    ctx = TermContext(student_shape=(4,), teacher_shape=(6,), num_data=20, train_labels=torch.arange(20) % 3)
    term = losses.get("crd", ctx, feat_dim=8, nce_k=3, nce_m=0.9).double()
    s = torch.randn(5, 4, generator=g, dtype=torch.float64)
    t = torch.randn(5, 6, generator=g, dtype=torch.float64)
    index = torch.tensor([0, 3, 7, 9, 12])
    before = (term.memory_s.clone(), term.memory_t.clone())
    with torch.no_grad():
        v_s = torch.nn.functional.normalize(term.embed_s(s), dim=1)
        v_t = torch.nn.functional.normalize(term.embed_t(t), dim=1)
    term(student_feats=s, teacher_feats=t, index=index)
    for bank, old, v in ((term.memory_s, before[0], v_s), (term.memory_t, before[1], v_t)):
        moved = 0.9 * old[index] + 0.1 * v
        torch.testing.assert_close(bank[index], moved / moved.norm(dim=1, keepdim=True), rtol=1e-12, atol=1e-14)
