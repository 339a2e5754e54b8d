"""The top-up kiosk (issue 5): host-authorized loads under the 1000-yuan cap."""
