"""The methods, one module each; importing ``tbps.models`` imports them all, which registers them."""
