set terminal pngcairo size 900,560 font ',10' noenhanced
set output 'sweep-p.png'
set title 'cmoe study top-p, p, mean and 95 percent CI over seeds'
set xlabel 'router.top_p'
set ylabel 'test mean_k'
set grid
set key outside right top
set offsets graph 0.05, graph 0.05, 0, 0
plot 'sweep-p.tsv' index 0 using 1:2:3 with yerrorlines lw 2 pt 7 lc rgb '#ccbb44' title 'p0.4'
