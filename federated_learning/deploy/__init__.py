"""The deploy launcher: embedded Redis plus every service as a supervised child process."""
