"""`distillery plan`: what a campaign will cost before it is submitted (docs/plan.md)."""
