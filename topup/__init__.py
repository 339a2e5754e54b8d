"""The top-up kiosk: host-authorized loads under the 1000-yuan cap."""
