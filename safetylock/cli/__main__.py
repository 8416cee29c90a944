from safetylock.cli import main

if __name__ == "__main__":
    main()
