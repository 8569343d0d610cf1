from common.teachers.denoiser import CFG_MODES, Denoiser, Guided, Prediction, cfg_combine

__all__ = ["CFG_MODES", "Denoiser", "Guided", "Prediction", "cfg_combine"]
