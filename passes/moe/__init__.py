"""Mixture-of-experts: predicting the next layer's experts from the current hidden state."""
