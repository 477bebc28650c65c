"""`objectcache ...`: small operator commands."""
